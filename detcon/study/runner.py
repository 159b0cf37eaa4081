"""One entry of the study: pretrain a method under the budget, probe its online torso, cache it.

Each entry is written atomically to <output>/results/<name>.json once finished, so a re-run
reuses it; an unfinished pretraining run resumes from its checkpoint in <output>/runs/<name>.
"""

import dataclasses
import json
import os
import resource
import time
from typing import Any, Callable

import numpy as np

from detcon import methods as methods_lib
from detcon.data import labelled
from detcon.evaluation import features, protocols
from detcon.study import budget as budget_lib
from detcon.study import report
from detcon.train import loop as train_loop
from detcon.weights import torso as torso_lib

RANDOM_INIT = "random_init"
RESULTS_DIRECTORY = "results"
RUNS_DIRECTORY = "runs"


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


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process so far, over all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def result_path(output_directory: str, name: str) -> str:
    """<output>/results/<name>.json."""
    return os.path.join(output_directory, RESULTS_DIRECTORY, f"{name}.json")


def load_finished(
    output_directory: str, name: str, budget: budget_lib.Budget, probes: Probes | None = None
) -> dict | None:
    """The cached entry of `name`, None if absent; an error if made under another budget or
    with other probe settings."""
    path = result_path(output_directory, name)
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
        seed=budget.seed,
    )
    return {
        "knn": protocols.run_knn(features.Extractor(torso), options),
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
) -> dict:
    steps = budget.steps if name != RANDOM_INIT else 0
    return {
        "name": name,
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
        **results,
    }


def run_method(
    method: str,
    budget: budget_lib.Budget,
    pretrain_directory: str,
    probes: Probes,
    output_directory: str,
    log: Callable[[str], None] = print,
) -> dict:
    """The finished entry of `method`: cached, or pretrained (resuming) and probed now."""
    finished = load_finished(output_directory, method, budget, probes)
    if finished is not None:
        log(f"{method}: reusing {result_path(output_directory, method)}")
        return finished
    config = budget_lib.method_config(method, budget, pretrain_directory, probes.num_classes)
    workdir = os.path.join(output_directory, RUNS_DIRECTORY, method)
    start, cpu = time.perf_counter(), _cpu_seconds()
    train_loop.run(config, workdir)
    train_seconds, train_cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    curve = _loss_curve(workdir)
    if curve and not np.isfinite(curve[-1]["objective"]):
        raise train_loop.NonFiniteLossError(
            f"{method}: the final pretraining loss in {workdir} is not finite."
        )
    start = time.perf_counter()
    results = _probe(torso_lib.load(workdir, "online").torso, budget, probes)
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
    )
    report.write_json(result_path(output_directory, method), entry)
    return entry


def run_random_init(
    budget: budget_lib.Budget,
    probes: Probes,
    output_directory: str,
    log: Callable[[str], None] = print,
) -> dict:
    """The finished entry of the untrained torso (the baseline every method must beat)."""
    finished = load_finished(output_directory, RANDOM_INIT, budget, probes)
    if finished is not None:
        log(f"{RANDOM_INIT}: reusing {result_path(output_directory, RANDOM_INIT)}")
        return finished
    start = time.perf_counter()
    torso = features.random_init(budget.depth, 1, budget.seed, budget.image_size)
    results = _probe(torso, budget, probes)
    entry = _entry(
        RANDOM_INIT, budget, probes, results, None, 0.0, 0.0, time.perf_counter() - start, []
    )
    report.write_json(result_path(output_directory, RANDOM_INIT), entry)
    return entry
