r"""Compares our selective search (detcon/data/build/region_priors.py) with OpenCV's on photos.

    pip install opencv-contrib-python-headless   # optional extra (setup.sh tries it)
    python scripts/compare_region_priors.py --draws=10 --output=region_priors.json

On the demo photos (scikit-image's bundled samples, full resolution), prints per photo how many of
OpenCV's top-30 boxes one of ours matches at IoU >= 0.5 and the reverse, averaged over rank draws,
beside the same figure between two OpenCV calls (the ceiling the random ranks leave).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import skimage.data
from absl import app, flags

from detcon import cli
from detcon.data.build import demo, region_priors_opencv

_DRAWS = flags.DEFINE_integer("draws", 10, "Rank draws (OpenCV calls) per photo.")
_OUTPUT = flags.DEFINE_string("output", None, "Optional JSON file for the numbers.")


def _photos() -> list[tuple[str, np.ndarray]]:
    photos = []
    for name in demo.PHOTOS:
        pixels = getattr(skimage.data, name)()
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[..., None], 3, axis=-1)
        photos.append((name, np.ascontiguousarray(pixels[..., :3])))
    return photos


@cli.one_line_usage_errors
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        import cv2  # noqa: F401
    except ImportError:
        raise app.UsageError(
            "needs opencv-contrib-python-headless: pip install opencv-contrib-python-headless"
        ) from None
    result = region_priors_opencv.compare(_photos(), draws=_DRAWS.value)
    columns = list(result["mean"])
    print("photo        " + " ".join(f"{c[:22]:>22}" for c in columns))
    for name, row in [*result["photos"].items(), ("mean", result["mean"])]:
        print(f"{name:12} " + " ".join(f"{row[c]:22.3f}" for c in columns))
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2, sort_keys=True)


if __name__ == "__main__":
    app.run(main)
