"""Host-side throughput: the tf.data pipeline's pairs/s and the FH mask writer's images/s.

TensorFlow is imported inside these functions only, so the step benchmark runs without it.
"""

import os
import time
from typing import Any, Iterable, Optional, Sequence

import numpy as np


def photo_jpegs(long_side: int) -> list[tuple[str, bytes]]:
    """(name, JPEG bytes) of scikit-image's bundled photos resized to `long_side` (and mirrored)."""
    import skimage.data
    from PIL import Image

    from detcon.data import image_codec
    from detcon.data.build import demo

    out = []
    for name in demo.PHOTOS:
        pixels = np.asarray(getattr(skimage.data, name)())
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[..., None], 3, axis=-1)
        image = Image.fromarray(pixels[..., :3].astype(np.uint8))
        scale = long_side / max(image.size)
        image = image.resize(
            (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale))),
            Image.BILINEAR,
        )
        pixels = np.asarray(image)
        out.append((f"{name}.jpg", image_codec.encode_jpeg(pixels)))
        mirror = np.ascontiguousarray(pixels[:, ::-1])
        out.append((f"{name}_mirror.jpg", image_codec.encode_jpeg(mirror)))
    return out


def photo_dataset(
    directory: str, long_side: int, scales: Sequence[float], min_sizes: Sequence[int]
) -> str:
    """A one-shard train split of the resized photos, written with the project's record writer."""
    from detcon.data import shards
    from detcon.data.build import fh_records

    path = os.path.join(directory, shards.shard_name("train", 0, 1))
    if not os.path.exists(path):
        os.makedirs(directory, exist_ok=True)
        with fh_records.atomic_shard(path) as writer:
            for label, (name, jpeg) in enumerate(photo_jpegs(long_side), start=1):
                writer.write(
                    fh_records.encode_record(
                        jpeg,
                        filename=name,
                        label=label,
                        synset=name,
                        text=None,
                        scales=scales,
                        min_sizes=min_sizes,
                    )
                )
    return directory


def benchmark_pipeline(
    directory: str,
    image_size: int,
    per_device_batch: int,
    parallel_calls: Iterable[Optional[int]],
    batches: int,
    warmup: int,
    dataset: str,
) -> list[dict[str, Any]]:
    """Two-view pairs/s of pretrain_batches at each num_parallel_calls (None: AUTOTUNE)."""
    from detcon.data import pipeline

    rows = []
    for parallel in parallel_calls:
        iterator = pipeline.pretrain_batches(
            directory,
            image_size=image_size,
            local_devices=1,
            per_device_batch=per_device_batch,
            deterministic=False,
            num_parallel_calls=parallel,
            shuffle_buffer=256,
        )
        for _ in range(warmup):
            batch = next(iterator)
        start = time.perf_counter()
        for _ in range(batches):
            batch = next(iterator)
        elapsed = time.perf_counter() - start
        assert batch["view1"].shape == (1, per_device_batch, image_size, image_size, 3)
        cores = parallel or os.cpu_count()
        pairs = batches * per_device_batch / elapsed
        rows.append(
            dict(
                dataset=dataset,
                image_size=image_size,
                batch=per_device_batch,
                num_parallel_calls=parallel if parallel else "autotune",
                host_cpus=os.cpu_count(),
                pairs_per_s=pairs,
                pairs_per_s_per_core=pairs / min(cores, os.cpu_count()),
            )
        )
        del iterator
    return rows


def benchmark_fh(
    jpegs: Sequence[tuple[str, bytes]],
    scales: Sequence[float],
    min_sizes: Sequence[int],
    workers: Iterable[int],
    rounds: int,
    work_directory: str,
) -> list[dict[str, Any]]:
    """Images/s of bare skimage felzenszwalb vs the mask writer (mask_job workers) per process."""
    from skimage.segmentation import felzenszwalb

    from detcon.data import image_codec
    from detcon.data.build import image_folder, mask_job

    pixels = [image_codec.to_rgb_jpeg(jpeg)[1] for _, jpeg in jpegs]
    megapixels = float(np.mean([p.shape[0] * p.shape[1] for p in pixels])) / 1e6
    felzenszwalb(pixels[0], scale=scales[0], min_size=min_sizes[0])  # first-call overheads
    start = time.perf_counter()
    for _ in range(rounds):
        for image in pixels:
            for scale, min_size in zip(scales, min_sizes):
                felzenszwalb(image, scale=scale, min_size=min_size)
    bare = rounds * len(pixels) / (time.perf_counter() - start)
    common = dict(
        images=len(pixels),
        mean_megapixels=megapixels,
        fh_scales=list(scales),
        fh_min_sizes=list(min_sizes),
    )
    rows = [
        dict(
            method="skimage felzenszwalb (bare)",
            workers=1,
            images_per_s=bare,
            images_per_s_per_worker=bare,
            relative_to_bare=1.0,
            **common,
        )
    ]

    folder = os.path.join(work_directory, "fh_images")
    os.makedirs(folder, exist_ok=True)
    files = []
    for name, jpeg in jpegs:
        path = os.path.join(folder, name)
        with open(path, "wb") as handle:
            handle.write(jpeg)
        files.append(image_folder.ImageFile(path, name, 0, "", None))
    params = mask_job.FhParams(tuple(scales), tuple(min_sizes))
    for num_workers in workers:
        work = files * max(rounds, 2 * num_workers)
        stamps = []
        start = time.perf_counter()
        for record, reason in mask_job.ordered_results(work, params, num_workers):
            if record is None:
                raise RuntimeError(f"the mask writer skipped an image: {reason}")
            stamps.append(time.perf_counter())
        # Rate once every worker has delivered: the pool's start-up is paid once per run, not
        # per image, so it is reported apart.
        warm = min(num_workers, len(stamps) - 1)
        rate = (
            (len(stamps) - 1 - warm) / (stamps[-1] - stamps[warm])
            if warm
            else (len(stamps) / (stamps[-1] - start))
        )
        rows.append(
            dict(
                method="detcon mask writer (mask_job)",
                workers=num_workers,
                images_per_s=rate,
                images_per_s_per_worker=rate / num_workers,
                relative_to_bare=rate / num_workers / bare,
                startup_s=stamps[warm] - start if warm else 0.0,
                **common,
            )
        )
    return rows
