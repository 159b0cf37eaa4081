"""The study's outputs: compare.json, a Markdown table and a bar chart of the probes."""

import io
import json
from typing import Sequence

import numpy as np

from detcon.weights import atomic

COLUMNS = (
    "method",
    "seeds",
    "masks?",
    "steps",
    "images seen",
    "final pretraining loss",
    "kNN top-1",
    "seg mIoU",
    "pixel acc",
    "wall time (s)",
)


def _number(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _spread(entry: dict, key: str) -> str:
    """'mean ± std' over the entry's seeds, or the plain value for one seed."""
    if len(entry.get("seeds", ())) > 1:
        return f"{entry[key]:.3f} ± {entry[key + '_std']:.3f}"
    return _number(entry[key], 3)


def table_row(entry: dict) -> list[str]:
    """The Markdown cells of one entry, in COLUMNS order."""
    masks = {True: "yes", False: "no", None: "–"}[entry["needs_masks"]]
    wall = entry["train_seconds"] + entry["eval_seconds"]
    return [
        entry["name"],
        ",".join(map(str, entry.get("seeds", ()))) or "–",
        masks,
        str(entry["steps"]),
        str(entry["images_seen"]),
        _number(entry["final_loss"], 3),
        _spread(entry, "knn_top1"),
        _spread(entry, "seg_miou"),
        _spread(entry, "pixel_accuracy"),
        f"{wall:.0f}",
    ]


def markdown_table(entries: Sequence[dict]) -> str:
    """A Markdown table with one row per entry, in order."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(table_row(e)) + " |" for e in entries]
    return "\n".join(lines) + "\n"


def comparison_table(rows: Sequence[dict]) -> str:
    """Markdown table of the comparisons: a win needs |a - b| > 2 x combined seed std."""
    lines = [
        "| a | b | probe | a - b | combined std | seeds | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['a']} | {r['b']} | {r['metric']} | {r['difference']:+.4f} | "
        f"{r['combined_std']:.4f} | {r['seeds']} | {r['verdict']} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def curves_png(methods: Sequence[dict], baseline: dict, title: str) -> bytes:
    """PNG bytes: each method's probes against pretraining step (every seed's points, the mean
    over seeds as a line), with the random-init range over seeds as a grey band."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(
        2,
        len(methods),
        figsize=(2.6 * len(methods) + 1, 5.2),
        squeeze=False,
        constrained_layout=True,
        sharey="row",
    )
    for column, method in enumerate(methods):
        for row, (key, label) in enumerate(
            (("seg_miou", "segmentation mIoU"), ("knn_top1", "kNN top-1 (shape)"))
        ):
            axis = axes[row][column]
            values = [point[key] for point in baseline["curve"]]
            axis.axhspan(min(values), max(values), color="0.85", label="random init range")
            steps = sorted({point["step"] for point in method["curve"]})
            means = [np.mean([p[key] for p in method["curve"] if p["step"] == s]) for s in steps]
            axis.scatter(
                [p["step"] for p in method["curve"]],
                [p[key] for p in method["curve"]],
                s=10,
                color="tab:blue",
                alpha=0.5,
            )
            axis.plot(steps, means, color="tab:blue", marker="o", markersize=3)
            axis.set_xlabel("pretraining step")
            if column == 0:
                axis.set_ylabel(label)
            if row == 0:
                axis.set_title(method["name"], fontsize=9)
    axes[0][0].legend(loc="lower right", fontsize=7)
    figure.suptitle(title, fontsize=9)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def write_json(path: str, document: dict) -> None:
    """Writes `document` as indented JSON, atomically."""
    atomic.write_text(path, json.dumps(document, indent=2, sort_keys=True) + "\n")


def bar_chart_png(methods: Sequence[dict], baseline: dict, title: str) -> bytes:
    """PNG bytes: seg mIoU and kNN top-1 per method, the random-init values as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    from matplotlib import pyplot as plt

    names = [m["name"] for m in methods]
    figure, axes = plt.subplots(
        1, 2, figsize=(max(6.0, 1.1 * len(names) + 2), 3.6), constrained_layout=True
    )
    for axis, key, label in (
        (axes[0], "seg_miou", "segmentation mIoU"),
        (axes[1], "knn_top1", "kNN top-1 (shape)"),
    ):
        values = [m[key] for m in methods]
        colours = ["tab:blue" if v > baseline[key] else "tab:red" for v in values]
        axis.bar(range(len(names)), values, color=colours)
        axis.axhline(
            baseline[key],
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"random init {baseline[key]:.3f}",
        )
        axis.set_xticks(range(len(names)), names, rotation=35, ha="right")
        axis.set_ylabel(label)
        axis.set_ylim(0, max(values + [baseline[key]]) * 1.15)
        axis.legend(loc="lower right", fontsize=8)
    figure.suptitle(title, fontsize=9)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def write_png(path: str, png: bytes) -> None:
    """Writes PNG bytes atomically."""
    atomic.atomic_write(path, lambda f: f.write(png))
