"""The learning-signal study: one budget for every method, the reports, resume, and the whole
pipeline on tiny scenes (two methods, two steps)."""

import dataclasses
import importlib
import json
import os

import numpy as np
import pytest

from detcon import methods as methods_lib
from detcon.data.build import scene_render, scenes
from detcon.study import budget as budget_lib
from detcon.study import compare, report, runner
from detcon.train import compilation_cache, optim
from detcon.train import loop as train_loop


def test_every_method_gets_the_same_budget_and_keeps_its_recipe():
    budget = budget_lib.Budget(
        steps=123,
        batch_size=32,
        depth=18,
        image_size=96,
        warmup_fraction=0.1,
        queue_batches=4,
        seed=3,
    )
    for name in methods_lib.names():
        recipe = importlib.import_module(f"configs.{name}").get_config()
        c = budget_lib.method_config(name, budget, "/data/pretrain", num_classes=7)
        assert (
            c.training.max_steps,
            c.training.batch_size,
            c.model.depth,
            c.data.image_size,
            c.optim.warmup_rule,
            c.optim.warmup_fraction,
        ) == (123, 32, 18, 96, "fraction", 0.1)
        assert c.data.dataset_directory == "/data/pretrain"
        # The recipe's optimiser, weight decay and method settings stay; the default
        # 'recipe_sqrt' scaling gives the published run's peak x sqrt(32 / its batch): base x
        # sqrt(recipe batch / 32), times the schedule's 32/256.
        assert (c.optim.name, c.optim.weight_decay) == (
            recipe.optim.name,
            recipe.optim.weight_decay,
        )
        assert c.optim.base_learning_rate == pytest.approx(
            (recipe.training.batch_size / 32) ** 0.5 * recipe.optim.base_learning_rate
        )
        for field, value in recipe[name].items():
            if field in methods_lib.get(name).hidden_size_fields:
                assert c[name][field] == value // 4, (name, field)  # ResNet-18: 512 of 2048
            elif field == "queue_size":
                assert c[name][field] == 4 * 32
            elif field != "patch_size":
                assert c[name][field] == value, (name, field)


@pytest.mark.parametrize("scaling,factor", [("none", 4.0), ("sqrt", 2.0), ("linear", 1.0)])
def test_peak_learning_rate_follows_the_chosen_batch_scaling(scaling, factor):
    budget = budget_lib.Budget(batch_size=64, lr_batch_scaling=scaling)
    c = budget_lib.method_config("byol", budget, "/data", num_classes=7)
    total = 100
    schedule = optim.learning_rate_fn(c, total)
    warmup = optim.warmup_steps(c, total)
    # Peak = recipe base 0.2 x 64/256 under linear scaling, times the factor of the rule.
    assert float(schedule(warmup)) == pytest.approx(0.2 * 64 / 256 * factor, rel=1e-6)


@pytest.mark.parametrize(
    "name,peak",
    [
        ("byol", 0.2 * 4096 / 256),
        ("simclr", 0.3 * 4096 / 256),
        ("detcon_b", 0.2 * 4096 / 256),
        ("moco_v2", 0.03),
    ],
)
def test_recipe_scaling_gives_every_method_the_peak_rate_of_its_published_run(name, peak):
    assert budget_lib.Budget().lr_batch_scaling == "recipe_sqrt"
    budget = budget_lib.Budget(batch_size=32, lr_batch_scaling="recipe")
    c = budget_lib.method_config(name, budget, "/data", num_classes=7)
    total = 100
    warmup = optim.warmup_steps(c, total)
    assert float(optim.learning_rate_fn(c, total)(max(warmup, 0))) == pytest.approx(peak, rel=1e-6)
    # recipe_sqrt (the default): the published peak x sqrt(32 / the published batch).
    recipe_batch = importlib.import_module(f"configs.{name}").get_config().training.batch_size
    c = budget_lib.method_config(name, budget_lib.Budget(batch_size=32), "/data", num_classes=7)
    assert float(optim.learning_rate_fn(c, total)(max(warmup, 0))) == pytest.approx(
        peak * (32 / recipe_batch) ** 0.5, rel=1e-6
    )


def test_target_horizon_caps_the_averaging_time_of_every_target():
    budget = budget_lib.Budget(steps=100, target_horizon=0.1)  # at most 10 steps: m <= 0.9
    for name in methods_lib.names():
        c = budget_lib.method_config(name, budget, "/data", num_classes=7)
        for field in ("base_ema", "momentum"):
            if field in c[name]:
                assert c[name][field] == pytest.approx(0.9), (name, field)
    recipes = budget_lib.method_config("moco_v2", budget_lib.Budget(steps=100), "/data", 7)
    assert recipes.moco_v2.momentum == 0.999
    assert budget_lib.capped_decay(0.5, 100, 0.1) == 0.5  # already shorter: unchanged


def test_head_scale_follows_the_torso_width():
    assert budget_lib.head_scale(50) == 1.0
    assert budget_lib.head_scale(10) == budget_lib.head_scale(18) == 0.25


@pytest.mark.parametrize(
    "field,value,flag",
    [
        ("steps", 0, "--steps"),
        ("depth", 11, "--depth"),
        ("image_size", 48, "--image_size"),
        ("warmup_fraction", 1.0, "--warmup_fraction"),
        ("lr_batch_scaling", "cubic", "--lr_batch_scaling"),
    ],
)
def test_bad_budget_names_the_flag(field, value, flag):
    with pytest.raises(ValueError, match=flag):
        budget_lib.Budget(**{field: value})


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(ValueError, match="byol"):
        compare.check_methods(["byol", "nope"])
    defaults = [n for n in methods_lib.names() if n != "detreg"]  # no region priors in scenes
    assert compare.check_methods([]) == defaults
    assert compare.check_methods(["detreg"]) == ["detreg"]


def _entry(name, miou, knn, masks=True):
    return {
        "name": name,
        "needs_masks": masks,
        "steps": 10,
        "images_seen": 80,
        "final_loss": 1.23456,
        "knn_top1": knn,
        "seg_miou": miou,
        "pixel_accuracy": 0.5,
        "train_seconds": 100.4,
        "eval_seconds": 20.0,
    }


def test_markdown_table_has_a_row_per_entry_in_column_order():
    text = report.markdown_table([_entry("detcon_b", 0.4, 0.7), _entry("byol", 0.3, 0.6, False)])
    lines = text.strip().split("\n")
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == list(report.COLUMNS)
    assert len(lines) == 4
    cells = [cell.strip() for cell in lines[3].strip("|").split("|")]
    assert cells == ["byol", "–", "no", "10", "80", "1.235", "0.600", "0.300", "0.500", "120"]


def _seed_run(name, seed, miou, knn, steps=(0, 10)):
    entry = dict(_entry(name, miou, knn), seed=seed, budget={}, probes={}, train_cpu_seconds=1.0)
    entry["curve"] = [
        {"step": s, "seed": seed, "seg_miou": miou * s / 10, "knn_top1": knn} for s in steps
    ]
    return entry


def test_seeds_aggregate_to_mean_and_sample_std_and_tables_show_both():
    runs = [
        _seed_run("byol", s, m, k) for s, m, k in ((0, 0.30, 0.6), (1, 0.34, 0.7), (2, 0.32, 0.8))
    ]
    entry = compare.aggregate(runs)
    assert entry["seeds"] == [0, 1, 2] and len(entry["runs"]) == 3 and len(entry["curve"]) == 6
    assert entry["seg_miou"] == pytest.approx(0.32) and entry["seg_miou_std"] == pytest.approx(0.02)
    assert entry["knn_top1_std"] == pytest.approx(np.std([0.6, 0.7, 0.8], ddof=1))
    assert entry["train_seconds"] == pytest.approx(3 * 100.4)
    row = report.table_row(entry)
    assert row[1] == "0,1,2" and row[6] == "0.700 ± 0.100" and row[7] == "0.320 ± 0.020"


def test_a_win_needs_twice_the_combined_seed_std():
    def method(name, values):
        return compare.aggregate([_seed_run(name, s, v, 0.5) for s, v in enumerate(values)])

    a, b = method("detcon_b", [0.50, 0.52, 0.54]), method("byol", [0.40, 0.42, 0.44])
    # difference 0.10, stds 0.02 each: combined 0.0283, twice that 0.0566 < 0.10: a wins.
    result = compare.margin(a, b, "seg_miou")
    assert result["difference"] == pytest.approx(0.10)
    assert result["combined_std"] == pytest.approx(0.02 * np.sqrt(2))
    assert result["verdict"] == "detcon_b"
    assert compare.margin(b, a, "seg_miou")["verdict"] == "detcon_b"
    close = method("byol", [0.47, 0.52, 0.57])  # std 0.05: 0.02 apart is noise
    assert compare.margin(a, close, "seg_miou")["verdict"] == "within noise"
    single = compare.aggregate([_seed_run("byol", 0, 0.1, 0.5)])
    assert compare.margin(a, single, "seg_miou")["verdict"] == "one seed: no verdict"
    rows = compare.comparisons([a, b], method("random_init", [0.3, 0.3, 0.3]))
    assert [(r["a"], r["b"], r["metric"]) for r in rows][:2] == [
        ("detcon_b", "byol", "seg_miou"),
        ("detcon_b", "byol", "knn_top1"),
    ]
    assert "| detcon_b | byol | seg_miou | +0.1000 |" in report.comparison_table(rows)


def test_evaluation_steps_are_checked_and_checkpoints_land_on_them():
    assert runner.check_eval_steps(1000, [300, 0, 100]) == [0, 100, 300, 1000]
    assert runner.checkpoint_spacing(1000, [0, 100, 300, 1000]) == 100
    assert runner.checkpoint_spacing(400, [0, 150, 400]) == 50
    with pytest.raises(ValueError, match=r"\[1200\] lie outside 0..--steps=1000"):
        runner.check_eval_steps(1000, [100, 1200])
    with pytest.raises(ValueError, match="larger common divisor"):
        runner.check_eval_steps(1000, [1, 999])


def test_curves_chart_is_a_png():
    entries = [compare.aggregate([_seed_run("byol", s, 0.3, 0.6, (0, 5, 10)) for s in (0, 1)])]
    baseline = compare.aggregate([_seed_run("random_init", s, 0.2, 0.5, (0,)) for s in (0, 1)])
    assert report.curves_png(entries, baseline, "t")[:8] == b"\x89PNG\r\n\x1a\n"


def test_bar_chart_is_a_png():
    png = report.bar_chart_png(
        [_entry("a", 0.4, 0.7), _entry("b", 0.2, 0.5)], _entry("random_init", 0.3, 0.6, None), "t"
    )
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_result_from_another_budget_is_refused(tmp_path):
    made = budget_lib.Budget(steps=10)
    path = runner.result_path(str(tmp_path), "byol")
    report.write_json(path, {"budget": dataclasses.asdict(made)})
    assert runner.load_finished(str(tmp_path), "byol", made) is not None
    with pytest.raises(ValueError, match=r"byol\.json.*differs in: steps"):
        runner.load_finished(str(tmp_path), "byol", budget_lib.Budget(steps=20))


def test_a_result_from_other_probe_settings_is_refused(tmp_path):
    made = budget_lib.Budget(steps=10)
    probes = runner.Probes("c", "s", 7, seg_image_size=256, seg_label_size=64)
    report.write_json(
        runner.result_path(str(tmp_path), "byol"),
        {"budget": dataclasses.asdict(made), "probes": dataclasses.asdict(probes)},
    )
    assert runner.load_finished(str(tmp_path), "byol", made, probes) is not None
    with pytest.raises(ValueError, match=r"byol\.json was probed with other settings"):
        runner.load_finished(
            str(tmp_path), "byol", made, dataclasses.replace(probes, seg_image_size=128)
        )


def test_labels_are_scored_at_the_scenes_own_side_unless_told():
    spec = scenes.SceneDatasetSpec()  # 64 px scenes
    assert compare.seg_label_side(256, 0, spec) == spec.scene.image_size == 64
    assert compare.seg_label_side(256, 128, spec) == 128
    with pytest.raises(ValueError, match="--seg_label_size=48 must divide --seg_image_size=256"):
        compare.seg_label_side(256, 48, spec)


TINY_SPEC = scenes.SceneDatasetSpec(
    seed=1,
    scene=scene_render.SceneParams(image_size=64),
    num_pretrain=16,
    num_voc_train=8,
    num_voc_val=4,
    num_classification_train=12,
    num_classification_val=6,
    pretrain_shards=1,
    classification_shards=1,
)


@pytest.mark.slow
def test_study_end_to_end_and_resume(tmp_path, monkeypatch):
    output = str(tmp_path / "study")
    budget = budget_lib.Budget(steps=2, batch_size=8, depth=10, image_size=64, queue_batches=2)
    names = ["detcon_b", "moco_v2"]
    kwargs = dict(
        spec=TINY_SPEC, seg_image_size=128, seg_label_size=64, seg_epochs=1, log=lambda _: None
    )
    document = compare.run(
        names, budget, str(tmp_path / "scenes"), output, eval_at_steps=[0, 1], **kwargs
    )

    with open(os.path.join(output, compare.JSON_NAME)) as f:
        assert json.load(f) == json.loads(json.dumps(document))
    assert [e["name"] for e in document["methods"]] == names
    assert document["seeds"] == [0] and document["eval_at_steps"] == [0, 1, 2]
    for entry in document["methods"]:
        (run,) = entry["runs"]
        assert entry["steps"] == 2 and entry["images_seen"] == 16 and entry["seeds"] == [0]
        assert [p["step"] for p in run["loss_curve"]][-1] == 2
        assert entry["knn_top1"] == run["knn"]["top1"]
        assert run["knn"]["num_eval"] == 6 and run["segmentation"]["num_eval"] == 4
        assert run["segmentation"]["label_size"] == 64
        # The default BatchNorm rule: statistics of each probe's own images, for every torso.
        assert run["knn"]["bn_statistics"] == run["segmentation"]["bn_statistics"] == "probe"
        assert all(p["knn_bank_effective_rank"] > 1 for p in entry["curve"])
        assert 0.0 <= entry["seg_miou"] <= 1.0
        # The probe curve: the method's own init, an intermediate checkpoint, the last step.
        assert [(p["step"], p["seed"]) for p in entry["curve"]] == [(0, 0), (1, 0), (2, 0)]
        assert entry["curve"][-1]["seg_miou"] == entry["seg_miou"]
        assert os.path.isdir(os.path.join(output, "runs", f"{entry['name']}-seed0", "checkpoints"))
    assert [e["needs_masks"] for e in document["methods"]] == [True, False]
    assert document["random_init"]["steps"] == 0
    assert document["beats_random_init_miou"] == {
        e["name"]: e["seg_miou"] > document["random_init"]["seg_miou"] for e in document["methods"]
    }

    with open(os.path.join(output, compare.TABLE_NAME)) as f:
        table, comparison = f.read().strip().split("\n\n")
    lines = table.split("\n")
    # detcon_b vs byol is absent (no byol here); each method vs random init, on both probes.
    assert comparison.count("| random_init |") == 2 * len(names)
    assert [c.strip() for c in lines[0].strip("|").split("|")] == list(report.COLUMNS)
    assert [line.split("|")[1].strip() for line in lines[2:]] == names + ["random_init"]
    for name in (compare.CHART_NAME, compare.CURVES_NAME):
        with open(os.path.join(output, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # A re-run reuses every finished entry: nothing trains, the numbers are the same.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished method was trained again")

    monkeypatch.setattr(train_loop, "run", no_training)
    logged = []
    again = compare.run(
        names,
        budget,
        str(tmp_path / "scenes"),
        output,
        eval_at_steps=[0, 1],
        **dict(kwargs, log=logged.append),
    )
    assert sum("reusing" in line for line in logged) == 3
    assert [e["seg_miou"] for e in again["methods"]] == [e["seg_miou"] for e in document["methods"]]


def test_a_stop_signal_anywhere_in_the_study_is_preempted_with_a_resume_hint(tmp_path):
    import signal

    from detcon import errors
    from detcon.study import stop

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(errors.Preempted) as stopped:
        with stop.stop_on_signals():
            os.kill(os.getpid(), signal.SIGTERM)  # e.g. while probing: no trainer handler
            for _ in range(1000):  # the handler runs between bytecodes, not later
                pass
            raise AssertionError("the signal was ignored")
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    hint = stop.resume_hint(str(tmp_path), stopped.value)
    assert hint.startswith("Stopped by SIGTERM. Finished methods are kept in ")
    assert os.path.join(str(tmp_path), "runs") in hint and hint.endswith("to resume.")
    # The trainer's own stop message is a sentence already: one full stop joins the two.
    trainer_stop = errors.Preempted("Stopped by SIGTERM after step 1. Run it again to resume.", 15)
    assert ".. " not in stop.resume_hint(str(tmp_path), trainer_stop)


@pytest.mark.slow
def test_sigterm_near_the_end_of_a_method_stops_the_study_which_then_resumes(tmp_path, monkeypatch):
    """A SIGTERM during the last training step used to be swallowed: the study ran on."""
    import signal

    from detcon import errors
    from detcon.study import stop

    output = str(tmp_path / "study")
    budget = budget_lib.Budget(steps=2, batch_size=8, depth=10, image_size=64)
    kwargs = dict(
        spec=TINY_SPEC, seg_image_size=128, seg_label_size=64, seg_epochs=1, log=lambda _: None
    )
    real_batches = train_loop.real_batches

    def terminated_in_the_last_step(config, directory, start_step, *args):
        for index, batch in enumerate(real_batches(config, directory, start_step, *args)):
            if index == 3:  # two batches are prefetched: batch 3 is drawn for the last step
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(train_loop, "real_batches", terminated_in_the_last_step)
    with pytest.raises(errors.Preempted) as stopped, stop.stop_on_signals():
        compare.run(["detcon_b"], budget, str(tmp_path / "scenes"), output, **kwargs)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    key = runner.run_key("detcon_b", budget.seed)
    run = os.path.join(output, "runs", key)
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["2"]  # saved, then stopped
    assert not os.path.exists(runner.result_path(output, key))  # not probed yet
    monkeypatch.undo()
    document = compare.run(["detcon_b"], budget, str(tmp_path / "scenes"), output, **kwargs)
    assert [e["name"] for e in document["methods"]] == ["detcon_b"]
    assert [p["step"] for p in document["methods"][0]["runs"][0]["loss_curve"]][-1] == 2


@pytest.mark.slow  # three tiny pretraining runs
@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="counts Linux memory maps")
def test_released_runs_do_not_accumulate_memory_maps(tmp_path):
    """Each pretraining run's compiled programs (~1,900 maps on CPU) are let go once released, so
    a study of many runs stays far below the kernel's per-process limit of 65,530 maps."""
    from detcon.train import loop as train_loop

    from conftest import tiny_config

    def train_and_release(name: str) -> int:
        config = tiny_config(batch_size=8, method="byol")
        config.training.max_steps = 1
        train_loop.run(config, str(tmp_path / name))
        compilation_cache.release_compiled_programs()
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)

    first = train_and_release("a")
    later = [train_and_release(name) for name in ("b", "c")]
    assert max(later) - first < 300, (first, later)
