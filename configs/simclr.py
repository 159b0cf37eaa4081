"""SimCLR on ImageNet: the recipe DetCon-S is compared with (ResNet-50, batch 4096).

Run:
  python -m detcon.main_loop --config=configs/simclr.py \
      --dataset_directory=/data/imagenet-fh --workdir=/ckpt/simclr --pretrain_epochs=1000
Smoke run on synthetic data:
  python -m detcon.main_loop --config=configs/simclr.py --mock_data --max_steps=2 \
      --batch_size=8 --config.model.depth=10 --config.data.image_size=64 --workdir=/tmp/w

SimCLR v1 (Chen et al., ICML 2020), the version DetCon-S is compared with, deliberately: the
tf2 code's defaults are SimCLR v2's (num_proj_layers 3, multiplicative brightness 'simclrv2').
Numbers from google-research/simclr tf2: model.py ProjectionHead with num_proj_layers=2 (v1's
two layers: hidden = feature width 2048 with BatchNorm and ReLU, output 128 with BatchNorm, no
bias), run.py (temperature 0.1, LARS, learning rate 0.3 x B/256, weight decay 1e-6, 10 warm-up
epochs), data_util.py crop_and_resize (tf.image.sample_distorted_bounding_box: area 0.08-1,
aspect 3/4-4/3, min_object_covered 0.1, 100 attempts, bicubic; config.data.crop_sampler
"tf_distorted_bbox"), color_jitter with strength 1.0 and impl='simclrv1' (random_brightness
additive as tf.image, contrast/saturation/hue from tf.image, random order: the dm_pix style),
random_blur (p 0.5, kernel a tenth of the side, 'SAME' zero padding).
Initialisation: Haiku's defaults (config.model.init "haiku"), not tf2's Keras ResNet init.
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
