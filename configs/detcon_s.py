"""DetCon-S on ImageNet: SimCLR's network and recipe with DetCon's mask pooling.

Run:
  python -m detcon.main_loop --config=configs/detcon_s.py \
      --dataset_directory=/data/imagenet-fh --workdir=/ckpt/detcon_s --pretrain_epochs=1000
Smoke run on synthetic data:
  python -m detcon.main_loop --config=configs/detcon_s.py --mock_data --max_steps=2 \
      --batch_size=8 --config.model.depth=10 --config.data.image_size=64 --workdir=/tmp/w

The DetCon paper (Sec. 3.2 and Appendix) trains DetCon-S as SimCLR: projector 2048 -> 128 with
BatchNorm, temperature 0.1, LARS 0.3 x B/256, weight decay 1e-6, with 16 sampled FH masks per
view as in DetCon-B.
"""

import ml_collections

from configs import base

SETTINGS = dict(
    projector_hidden_size=2048,
    projector_output_size=128,
    temperature=0.1,
    num_samples=16,  # masks sampled per image and view
    max_mask_id=256,
    augmentations="simclr",
)


def get_config() -> ml_collections.ConfigDict:
    """Returns the locked DetCon-S ImageNet config."""
    c = base.get_config("detcon_s", SETTINGS)
    c.optim.base_learning_rate = 0.3
    c.optim.weight_decay = 1e-6
    c.lock()
    return c
