"""The study's outputs: compare.json, a Markdown table and a bar chart of the probes."""

import io
import json
from typing import Sequence

from detcon.weights import atomic

COLUMNS = (
    "method",
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


def table_row(entry: dict) -> list[str]:
    """The Markdown cells of one entry, in COLUMNS order."""
    masks = {True: "yes", False: "no", None: "–"}[entry["needs_masks"]]
    wall = entry["train_seconds"] + entry["eval_seconds"]
    return [
        entry["name"],
        masks,
        str(entry["steps"]),
        str(entry["images_seen"]),
        _number(entry["final_loss"], 3),
        _number(entry["knn_top1"], 3),
        _number(entry["seg_miou"], 3),
        _number(entry["pixel_accuracy"], 3),
        f"{wall:.0f}",
    ]


def markdown_table(entries: Sequence[dict]) -> str:
    """A Markdown table with one row per entry, in order."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(table_row(e)) + " |" for e in entries]
    return "\n".join(lines) + "\n"


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
