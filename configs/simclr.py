"""SimCLR on ImageNet: the recipe DetCon-S is compared with (ResNet-50, batch 4096).

Run:
  python -m detcon.main_loop --config=configs/simclr.py \
      --dataset_directory=/data/imagenet-fh --workdir=/ckpt/simclr --pretrain_epochs=1000
Smoke run on synthetic data:
  python -m detcon.main_loop --config=configs/simclr.py --mock_data --max_steps=2 \
      --batch_size=8 --config.model.depth=10 --config.data.image_size=64 --workdir=/tmp/w

Numbers from google-research/simclr: tf2/model.py (projection head: hidden = feature width 2048,
output 128, BatchNorm after each layer), tf2/run.py (temperature 0.1, LARS, learning rate
0.3 x B/256, weight decay 1e-6, 10 warm-up epochs) and data_util.py (colour strength 1.0).
"""

import ml_collections

from configs import base

SETTINGS = dict(
    projector_hidden_size=2048,
    projector_output_size=128,
    temperature=0.1,
    augmentations="simclr",  # "simclr": SimCLR's symmetric views; "byol": BYOL's pair
)


def get_config() -> ml_collections.ConfigDict:
    """Returns the locked SimCLR ImageNet config."""
    c = base.get_config("simclr", SETTINGS)
    c.optim.base_learning_rate = 0.3
    c.optim.weight_decay = 1e-6
    c.data.crop_sampler = "tf_distorted_bbox"  # tf2/data_util.py crop_and_resize
    c.lock()
    return c
