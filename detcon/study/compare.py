"""The study end to end: scenes -> every method under one budget -> probes -> json, table, chart."""

import dataclasses
import os
import platform
import time
from typing import Callable, Sequence

import numpy as np

from detcon import methods as methods_lib
from detcon.data.build import scenes
from detcon.study import budget as budget_lib
from detcon.study import report, runner
from detcon.weights import atomic

JSON_NAME, TABLE_NAME, CHART_NAME = "compare.json", "compare.md", "compare.png"


def default_methods() -> list[str]:
    """The registered methods the scenes' records can feed: those needing region priors
    (DETReg) are left out, since the scenes carry none yet; naming them still runs them."""
    budget = budget_lib.Budget()
    return [
        name
        for name in methods_lib.names()
        if methods_lib.get(name)
        .data_needs(budget_lib.method_config(name, budget, "", num_classes=1))
        .num_regions
        == 0
    ]


def check_methods(names: Sequence[str]) -> list[str]:
    """`names` validated against the registry (default_methods() when empty)."""
    registered = methods_lib.names()
    chosen = list(dict.fromkeys(names)) or default_methods()
    unknown = [n for n in chosen if n not in registered]
    if unknown:
        raise ValueError(
            f"--methods={','.join(names)}: unknown {', '.join(unknown)}; choose "
            f"from {','.join(registered)}."
        )
    return chosen


def seg_label_side(seg_image_size: int, seg_label_size: int, spec: scenes.SceneDatasetSpec) -> int:
    """Side the segmentation labels are scored at: `seg_label_size`, or 0 for the scenes' own
    side (the enlarged labels are then exactly the original ones); it must divide the input."""
    side = seg_label_size or spec.scene.image_size
    if seg_image_size % side:
        raise ValueError(f"--seg_label_size={side} must divide --seg_image_size={seg_image_size}.")
    return side


def ensure_scenes(
    directory: str, spec: scenes.SceneDatasetSpec, log: Callable[[str], None] = print
) -> str:
    """The scenes root: reused when present (same spec), otherwise built now."""
    if not os.path.isdir(directory):
        log(f"building the scenes in {directory} ...")
    return scenes.build(spec, directory)


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}"


# The comparisons the study reports: each mask-based method against its image-level counterpart.
PAIRS = (("detcon_b", "byol"), ("detcon_s", "simclr"), ("densecl", "moco_v2"))
METRICS = ("seg_miou", "knn_top1")
CURVES_NAME = "curves.png"


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value)."""
    array = np.asarray(values, np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def aggregate(runs: Sequence[dict]) -> dict:
    """One method's (or random init's) entry over its seeds: the per-seed runs, their probe
    curves, and mean and standard deviation of every headline number."""
    first = runs[0]
    entry = {
        key: first[key]
        for key in ("name", "needs_masks", "steps", "images_seen", "budget", "probes")
    }
    entry["seeds"] = [run["seed"] for run in runs]
    for key in (*METRICS, "pixel_accuracy"):
        entry[key], entry[f"{key}_std"] = mean_and_std([run[key] for run in runs])
    losses = [run["final_loss"] for run in runs if run["final_loss"] is not None]
    entry["final_loss"] = mean_and_std(losses)[0] if losses else None
    for key in ("train_seconds", "train_cpu_seconds", "eval_seconds"):
        entry[key] = float(sum(run[key] for run in runs))
    entry["curve"] = [point for run in runs for point in run["curve"]]
    entry["runs"] = list(runs)
    return entry


def margin(a: dict, b: dict, metric: str) -> dict:
    """a - b on `metric` against twice their combined seed standard deviation."""
    diff = a[metric] - b[metric]
    combined = float(np.hypot(a[f"{metric}_std"], b[f"{metric}_std"]))
    seeds = min(len(a["seeds"]), len(b["seeds"]))
    if seeds < 2:
        verdict = "one seed: no verdict"
    elif abs(diff) > 2 * combined:
        verdict = a["name"] if diff > 0 else b["name"]
    else:
        verdict = "within noise"
    return {
        "a": a["name"],
        "b": b["name"],
        "metric": metric,
        "difference": diff,
        "combined_std": combined,
        "seeds": seeds,
        "verdict": verdict,
    }


def comparisons(entries: Sequence[dict], baseline: dict) -> list[dict]:
    """Every PAIRS comparison present, and every method against random init, on both probes."""
    by_name = {e["name"]: e for e in entries}
    out = [
        margin(by_name[a], by_name[b], m)
        for a, b in PAIRS
        if a in by_name and b in by_name
        for m in METRICS
    ]
    out += [margin(e, baseline, m) for e in entries for m in METRICS]
    return out


def run(
    method_names: Sequence[str],
    budget: budget_lib.Budget,
    scenes_directory: str,
    output_directory: str,
    spec: scenes.SceneDatasetSpec = scenes.SceneDatasetSpec(),  # noqa: B008 - frozen value
    seg_image_size: int = 256,
    seg_label_size: int = 0,
    seg_epochs: int = 30,
    log: Callable[[str], None] = print,
    seeds: Sequence[int] = (),
    eval_at_steps: Sequence[int] = (),
    bn_statistics: str = "probe",
) -> dict:
    """Runs (or reuses) every (method, seed) and writes compare.json, compare.md, compare.png
    and, with evaluation steps, curves.png. Seeds default to budget.seed."""
    chosen = check_methods(method_names)
    seeds = list(dict.fromkeys(seeds)) or [budget.seed]
    eval_steps = runner.check_eval_steps(budget.steps, eval_at_steps)
    seg_label_size = seg_label_side(seg_image_size, seg_label_size, spec)
    root = ensure_scenes(scenes_directory, spec, log)
    probes = runner.Probes(
        classification_directory=os.path.join(root, scenes.CLASSIFICATION_DIRECTORY),
        segmentation_directory=os.path.join(root, scenes.VOC_DIRECTORY),
        num_classes=len(scenes.class_names()) + 1,
        seg_image_size=seg_image_size,
        seg_label_size=seg_label_size,
        seg_epochs=seg_epochs,
        bn_statistics=bn_statistics,
    )
    pretrain = os.path.join(root, scenes.PRETRAIN_DIRECTORY)
    start = time.perf_counter()
    per_seed = [dataclasses.replace(budget, seed=seed) for seed in seeds]
    baseline = aggregate(
        [runner.run_random_init(b, probes, output_directory, log) for b in per_seed]
    )
    entries = []
    for name in chosen:
        log(
            f"{name}: {budget.steps} steps at batch {budget.batch_size}, ResNet-{budget.depth}, "
            f"{budget.image_size} px, seeds {','.join(map(str, seeds))}"
        )
        runs = [
            runner.run_method(name, b, pretrain, probes, output_directory, log, eval_steps)
            for b in per_seed
        ]
        entry = aggregate(runs)
        log(
            f"{name}: kNN top-1 {entry['knn_top1']:.3f}, seg mIoU {entry['seg_miou']:.3f} "
            f"(random init {baseline['knn_top1']:.3f}, {baseline['seg_miou']:.3f})"
        )
        entries.append(entry)
    document = {
        "budget": dataclasses.asdict(budget),
        "seeds": seeds,
        "eval_at_steps": eval_steps,
        "scenes": os.path.abspath(root),
        "probes": dataclasses.asdict(probes),
        "machine": _machine(),
        "wall_seconds_this_run": time.perf_counter() - start,
        "beats_random_init_miou": {
            e["name"]: e["seg_miou"] > baseline["seg_miou"] for e in entries
        },
        "comparisons": comparisons(entries, baseline),
        "random_init": baseline,
        "methods": entries,
    }
    report.write_json(os.path.join(output_directory, JSON_NAME), document)
    atomic.write_text(
        os.path.join(output_directory, TABLE_NAME),
        report.markdown_table(entries + [baseline])
        + "\n"
        + report.comparison_table(document["comparisons"]),
    )
    title = (
        f"{budget.steps} steps x batch {budget.batch_size}, ResNet-{budget.depth}, "
        f"{budget.image_size} px scenes, seeds {','.join(map(str, seeds))}"
    )
    report.write_png(
        os.path.join(output_directory, CHART_NAME), report.bar_chart_png(entries, baseline, title)
    )
    if len(eval_steps) > 1:
        report.write_png(
            os.path.join(output_directory, CURVES_NAME),
            report.curves_png(entries, baseline, title),
        )
    return document
