"""One entry of the study: pretrain a method under the budget, probe its online torso, cache it.

Each entry is written atomically to <output>/results/<name>.json once finished, so a re-run
reuses it; an unfinished pretraining run resumes from its checkpoint in <output>/runs/<name>.
"""

import dataclasses
import json
import math
import os
import resource
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from detcon import methods as methods_lib
from detcon.data import labelled
from detcon.evaluation import features, protocols
from detcon.study import budget as budget_lib
from detcon.study import report
from detcon.train import compilation_cache
from detcon.train import experiment as experiment_lib
from detcon.train import loop as train_loop
from detcon.weights import torso as torso_lib

RANDOM_INIT = "random_init"
RESULTS_DIRECTORY = "results"
RUNS_DIRECTORY = "runs"
MAX_KEPT_CHECKPOINTS = 64  # ResNet-10 states are ~20 MB; more would fill small disks


@dataclasses.dataclass(frozen=True)
class Probes:
    """Settings of the two probes, the same for every entry."""

    classification_directory: str  # single-object train/validation TFRecords (kNN)
    segmentation_directory: str  # VOC-layout scenes (segmentation probe)
    num_classes: int  # segmentation classes, background included
    seg_image_size: int = 256
    seg_label_size: int = 0  # 0: seg_image_size; the scenes' own side scores them exactly
    seg_epochs: int = 30
    knn_k: int = 20
    # "probe": BatchNorm statistics measured on each probe's training images, one rule for trained
    # and untrained torsos; "moving": the checkpoint's (the identity for the random init).
    bn_statistics: str = "probe"


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process so far, over all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_key(name: str, seed: int) -> str:
    """The name of one (method or random init, seed) entry: '<name>-seed<seed>'."""
    return f"{name}-seed{seed}"


def result_path(output_directory: str, key: str) -> str:
    """<output>/results/<key>.json."""
    return os.path.join(output_directory, RESULTS_DIRECTORY, f"{key}.json")


def curve_path(output_directory: str, key: str) -> str:
    """<output>/results/<key>.curve.json: probe results along the run, saved as they finish."""
    return os.path.join(output_directory, RESULTS_DIRECTORY, f"{key}.curve.json")


def checkpoint_spacing(steps: int, eval_at_steps: Sequence[int]) -> int:
    """Checkpoint period that lands on every evaluation step and on the last step."""
    return math.gcd(steps, *[s for s in eval_at_steps if s > 0])


def check_eval_steps(steps: int, eval_at_steps: Sequence[int]) -> list[int]:
    """Sorted evaluation steps within [0, steps], the last step always included."""
    chosen = sorted(set(eval_at_steps) | {steps})
    outside = [s for s in chosen if s < 0 or s > steps]
    if outside:
        raise ValueError(
            f"--eval_at_steps={','.join(map(str, eval_at_steps))}: {outside} lie outside "
            f"0..--steps={steps}."
        )
    kept = steps // checkpoint_spacing(steps, chosen)
    if kept > MAX_KEPT_CHECKPOINTS:
        raise ValueError(
            f"--eval_at_steps={','.join(map(str, eval_at_steps))} with --steps={steps} needs a "
            f"checkpoint every {checkpoint_spacing(steps, chosen)} steps ({kept} kept); choose "
            f"steps with a larger common divisor (at most {MAX_KEPT_CHECKPOINTS} checkpoints)."
        )
    return chosen


def load_finished(
    output_directory: str, key: str, budget: budget_lib.Budget, probes: Probes | None = None
) -> dict | None:
    """The cached entry `key`, None if absent; an error if made under another budget or with
    other probe settings."""
    path = result_path(output_directory, key)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        document = json.load(f)
    wanted = dataclasses.asdict(budget)
    if document.get("budget") != wanted:
        differing = sorted(k for k in wanted if document.get("budget", {}).get(k) != wanted[k])
        raise ValueError(
            f"{path} was made under another budget (differs in: "
            f"{', '.join(differing)}); use a new --output_directory or delete "
            f"{output_directory}/{RESULTS_DIRECTORY} and {RUNS_DIRECTORY}."
        )
    if probes is not None and document.get("probes") != dataclasses.asdict(probes):
        raise ValueError(
            f"{path} was probed with other settings ({document['probes']}); use a "
            f"new --output_directory or delete {output_directory}/"
            f"{RESULTS_DIRECTORY} (the pretraining runs are reused)."
        )
    return document


def _probe(
    torso: torso_lib.FrozenTorso, budget: budget_lib.Budget, probes: Probes
) -> dict[str, dict[str, Any]]:
    """kNN on the single-object split and the segmentation probe on the VOC scenes."""
    options = protocols.Options(
        source=labelled.Source(directory=probes.classification_directory),
        segmentation_directory=probes.segmentation_directory,
        image_size=budget.image_size,
        knn_k=probes.knn_k,
        seg_image_size=probes.seg_image_size,
        seg_label_size=probes.seg_label_size,
        seg_epochs=probes.seg_epochs,
        seg_num_classes=probes.num_classes,
        bn_statistics=probes.bn_statistics,
        seed=budget.seed,
    )
    return {
        "knn": protocols.run_knn(features.Extractor(torso), options, torso),
        "segmentation": protocols.run_segmentation(torso, options),
    }


def _loss_curve(workdir: str) -> list[dict[str, float]]:
    """(step, objective, projection std) of every line of the run's metrics.jsonl."""
    curve = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "objective" not in record and "loss" not in record:
                continue  # e.g. a monitor line
            objective = record.get("objective", record.get("loss"))
            point = {"step": record["step"], "objective": objective}
            for key in ("projection_std", "prediction_std"):
                if key in record:
                    point[key] = record[key]
            curve.append(point)
    return curve


def _entry(
    name: str,
    budget: budget_lib.Budget,
    probes: Probes,
    results: dict,
    needs_masks: bool | None,
    train_seconds: float,
    train_cpu_seconds: float,
    eval_seconds: float,
    curve: list[dict[str, float]],
    probe_curve: list[dict[str, float]],
) -> dict:
    steps = budget.steps if name != RANDOM_INIT else 0
    return {
        "name": name,
        "seed": budget.seed,
        "budget": dataclasses.asdict(budget),
        "probes": dataclasses.asdict(probes),
        "needs_masks": needs_masks,
        "steps": steps,
        "images_seen": steps * budget.batch_size,
        "final_loss": curve[-1]["objective"] if curve else None,
        "knn_top1": results["knn"]["top1"],
        "seg_miou": results["segmentation"]["miou"],
        "pixel_accuracy": results["segmentation"]["pixel_accuracy"],
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "eval_seconds": eval_seconds,
        "loss_curve": curve,
        "curve": probe_curve,
        **results,
    }


def _curve_point(step: int, seed: int, results: dict) -> dict:
    """One record of a probe curve."""
    point = {
        "step": step,
        "seed": seed,
        "seg_miou": results["segmentation"]["miou"],
        "knn_top1": results["knn"]["top1"],
    }
    if "bank_spread" in results["knn"]:  # absent from entries cached before it was measured
        point["knn_bank_effective_rank"] = results["knn"]["bank_spread"]["effective_rank"]
    return point


def initial_torso(config: Any, steps: int) -> torso_lib.FrozenTorso:
    """The method's own online torso at step 0 (its init draw), BatchNorm statistics at unit
    variance as the random-init baseline has them (Haiku's EMAs start at 0, not a statistic)."""
    state = experiment_lib.build(config, steps).init_state(jax.random.PRNGKey(config.training.seed))
    torso = torso_lib.from_network(
        features.host_tree(state.online_params),
        features.host_tree(state.online_state),
        config.model,
    )
    return torso._replace(state=features.unit_variance_statistics(torso.state))


def _probe_along_the_run(
    key: str,
    config: Any,
    workdir: str,
    eval_steps: Sequence[int],
    budget: budget_lib.Budget,
    probes: Probes,
    output_directory: str,
    log: Callable[[str], None],
) -> tuple[list[dict], dict]:
    """Probe records at every evaluation step (reusing saved ones) and the last step's results."""
    path = curve_path(output_directory, key)
    saved: dict[str, dict] = {}
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
    for step in eval_steps:
        if str(step) in saved:
            continue
        if step == 0:
            torso = initial_torso(config, budget.steps)
        else:
            step_directory = os.path.join(workdir, "checkpoints", str(step))
            torso = torso_lib.load(step_directory, "online").torso
        saved[str(step)] = _probe(torso, budget, probes)
        report.write_json(path, saved)
        point = _curve_point(step, budget.seed, saved[str(step)])
        log(
            f"{key} step {step}: kNN top-1 {point['knn_top1']:.3f}, seg mIoU {point['seg_miou']:.3f}"
        )
    curve = [_curve_point(s, budget.seed, saved[str(s)]) for s in eval_steps]
    return curve, saved[str(budget.steps)]


def run_method(
    method: str,
    budget: budget_lib.Budget,
    pretrain_directory: str,
    probes: Probes,
    output_directory: str,
    log: Callable[[str], None] = print,
    eval_at_steps: Sequence[int] = (),
) -> dict:
    """The finished entry of `method` at budget.seed: cached, or pretrained (resuming) and probed
    now at every step of `eval_at_steps` and at the last step."""
    key = run_key(method, budget.seed)
    finished = load_finished(output_directory, key, budget, probes)
    if finished is not None:
        log(f"{key}: reusing {result_path(output_directory, key)}")
        return finished
    eval_steps = check_eval_steps(budget.steps, eval_at_steps)
    config = budget_lib.method_config(method, budget, pretrain_directory, probes.num_classes)
    # Checkpoints land on every evaluation step and are all kept until probed.
    spacing = checkpoint_spacing(budget.steps, eval_steps)
    config.training.checkpoint_every_steps = spacing
    config.training.keep_checkpoints = budget.steps // spacing + 1
    workdir = os.path.join(output_directory, RUNS_DIRECTORY, key)
    start, cpu = time.perf_counter(), _cpu_seconds()
    train_loop.run(config, workdir)
    train_seconds, train_cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    compilation_cache.release_compiled_programs()  # the probes compile programs of their own
    curve = _loss_curve(workdir)
    if curve and not np.isfinite(curve[-1]["objective"]):
        raise train_loop.NonFiniteLossError(
            f"{method}: the final pretraining loss in {workdir} is not finite."
        )
    start = time.perf_counter()
    probe_curve, results = _probe_along_the_run(
        key, config, workdir, eval_steps, budget, probes, output_directory, log
    )
    entry = _entry(
        method,
        budget,
        probes,
        results,
        methods_lib.get(method).needs_masks,
        train_seconds,
        train_cpu,
        time.perf_counter() - start,
        curve,
        probe_curve,
    )
    report.write_json(result_path(output_directory, key), entry)
    compilation_cache.release_compiled_programs()
    return entry


def run_random_init(
    budget: budget_lib.Budget,
    probes: Probes,
    output_directory: str,
    log: Callable[[str], None] = print,
) -> dict:
    """The finished entry of the untrained torso at budget.seed (the baseline to beat)."""
    key = run_key(RANDOM_INIT, budget.seed)
    finished = load_finished(output_directory, key, budget, probes)
    if finished is not None:
        log(f"{key}: reusing {result_path(output_directory, key)}")
        return finished
    start = time.perf_counter()
    torso = features.random_init(budget.depth, 1, budget.seed, budget.image_size)
    results = _probe(torso, budget, probes)
    entry = _entry(
        RANDOM_INIT,
        budget,
        probes,
        results,
        None,
        0.0,
        0.0,
        time.perf_counter() - start,
        [],
        [_curve_point(0, budget.seed, results)],
    )
    report.write_json(result_path(output_directory, key), entry)
    compilation_cache.release_compiled_programs()
    return entry
