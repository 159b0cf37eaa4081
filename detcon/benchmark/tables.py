"""Fixed-width text tables of benchmark rows."""

from typing import Any, Sequence


def format_table(
    title: str, rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]
) -> str:
    """A fixed-width text table: columns are (key, header, format spec)."""

    def cell(row: dict[str, Any], key: str, spec: str) -> str:
        value = row.get(key)
        if value is None:
            return "-"
        if isinstance(value, str) or not spec:
            return str(value)
        return format(value, spec)

    header = [h for _, h, _ in columns]
    body = [[cell(r, k, s) for k, _, s in columns] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    lines = [title, "  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in body]
    return "\n".join(lines)


STEP_COLUMNS = (
    ("method", "method", ""),
    ("depth", "depth", "d"),
    ("image_size", "px", "d"),
    ("precision", "precision", ""),
    ("per_device_batch", "batch/dev", "d"),
    ("devices", "devs", "d"),
    ("status", "status", ""),
    ("images_per_s", "img/s", ".1f"),
    ("images_per_s_per_device", "img/s/dev", ".1f"),
    ("step_ms", "ms/step", ".1f"),
    ("lower_s", "lower s", ".1f"),
    ("compile_s", "compile s", ".1f"),
    ("temp_gib", "temp GiB", ".2f"),
    ("model_tflops_per_device", "TFLOP/s", ".1f"),
    ("mfu", "MFU", ".1%"),
)
CONV_COLUMNS = (
    ("layer", "first layer", ""),
    ("count", "layers", "d"),
    ("input_shape", "input HWC", ""),
    ("kernel", "k", "d"),
    ("stride", "s", "d"),
    ("output_channels", "out", "d"),
    ("batch", "batch", "d"),
    ("native_ms", "native ms", ".1f"),
    ("patch_ms", "patch ms", ".1f"),
    ("speedup", "speed-up", ".1f"),
    ("relative_difference", "rel. diff", ".1e"),
)
MASK_COLUMNS = (
    ("op", "op", ""),
    ("batch", "batch", "d"),
    ("image_size", "px", "d"),
    ("max_mask_id", "M", "d"),
    ("ms", "ms", ".2f"),
    ("images_per_s", "img/s", ".0f"),
    ("peak_mib", "temp+out MiB", ".1f"),
    ("compile_s", "compile s", ".2f"),
    ("outputs_equal", "equal", ""),
)
PIPELINE_COLUMNS = (
    ("dataset", "dataset", ""),
    ("image_size", "px", "d"),
    ("batch", "batch", "d"),
    ("num_parallel_calls", "parallel calls", ""),
    ("host_cpus", "host cpus", "d"),
    ("pairs_per_s", "pairs/s", ".1f"),
    ("pairs_per_s_per_core", "pairs/s/core", ".1f"),
)
FH_COLUMNS = (
    ("method", "method", ""),
    ("workers", "workers", "d"),
    ("mean_megapixels", "MPix", ".2f"),
    ("images_per_s", "img/s", ".2f"),
    ("images_per_s_per_worker", "img/s/worker", ".2f"),
    ("relative_to_bare", "vs bare", ".2f"),
    ("startup_s", "start-up s", ".1f"),
)
