"""The study end to end: scenes -> every method under one budget -> probes -> json, table, chart."""

import dataclasses
import os
import platform
import time
from typing import Callable, Sequence

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
) -> dict:
    """Runs (or reuses) every entry and writes compare.json, compare.md and compare.png."""
    chosen = check_methods(method_names)
    seg_label_size = seg_label_side(seg_image_size, seg_label_size, spec)
    root = ensure_scenes(scenes_directory, spec, log)
    probes = runner.Probes(
        classification_directory=os.path.join(root, scenes.CLASSIFICATION_DIRECTORY),
        segmentation_directory=os.path.join(root, scenes.VOC_DIRECTORY),
        num_classes=len(scenes.class_names()) + 1,
        seg_image_size=seg_image_size,
        seg_label_size=seg_label_size,
        seg_epochs=seg_epochs,
    )
    pretrain = os.path.join(root, scenes.PRETRAIN_DIRECTORY)
    start = time.perf_counter()
    baseline = runner.run_random_init(budget, probes, output_directory, log)
    entries = []
    for name in chosen:
        log(
            f"{name}: {budget.steps} steps at batch {budget.batch_size}, ResNet-{budget.depth}, "
            f"{budget.image_size} px"
        )
        entry = runner.run_method(name, budget, pretrain, probes, output_directory, log)
        log(
            f"{name}: kNN top-1 {entry['knn_top1']:.3f}, seg mIoU {entry['seg_miou']:.3f} "
            f"(random init {baseline['knn_top1']:.3f}, {baseline['seg_miou']:.3f})"
        )
        entries.append(entry)
    document = {
        "budget": dataclasses.asdict(budget),
        "scenes": os.path.abspath(root),
        "probes": dataclasses.asdict(probes),
        "machine": _machine(),
        "wall_seconds_this_run": time.perf_counter() - start,
        "beats_random_init_miou": {
            e["name"]: e["seg_miou"] > baseline["seg_miou"] for e in entries
        },
        "random_init": baseline,
        "methods": entries,
    }
    report.write_json(os.path.join(output_directory, JSON_NAME), document)
    atomic.write_text(
        os.path.join(output_directory, TABLE_NAME), report.markdown_table(entries + [baseline])
    )
    title = (
        f"{budget.steps} steps x batch {budget.batch_size}, ResNet-{budget.depth}, "
        f"{budget.image_size} px scenes"
    )
    report.write_png(
        os.path.join(output_directory, CHART_NAME), report.bar_chart_png(entries, baseline, title)
    )
    return document
