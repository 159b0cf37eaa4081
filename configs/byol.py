"""BYOL on ImageNet: the official recipe (ResNet-50, 224 px, batch 4096, 1000 epochs).

Run:
  python -m detcon.main_loop --config=configs/byol.py \
      --dataset_directory=/data/imagenet-fh --workdir=/ckpt/byol --pretrain_epochs=1000
Smoke run on synthetic data:
  python -m detcon.main_loop --config=configs/byol.py --mock_data --max_steps=2 \
      --batch_size=8 --config.model.depth=10 --config.data.image_size=64 --workdir=/tmp/w

BYOL reads the same TFRecords as DetCon but not their masks. Numbers from
google-deepmind/deepmind-research byol/configs/byol.py (projector 4096 -> 256, predictor 4096,
base_target_ema 0.996, LARS with lr 0.2 x B/256, weight decay 1.5e-6, 10 warm-up epochs of
1000), byol/utils/augmentations.py (the asymmetric view presets), byol/utils/dataset.py (the
never-rejecting crop formula, config.data.crop_sampler "released") and byol/byol_experiment.py
_make_initial_state (the target drawn from its own key, not copied).
Departure: ResNet-18/34 have no projection shortcut in their first block group, where BYOL's
byol/utils/networks.py has one (use_projection all True): torchvision's and detectron2's
ResNet-18/34 have no slot for it, so such a torso could not be exported or loaded by the
shared torso loader (ResNet-50 and deeper agree with the release).
"""

import ml_collections

from configs import base

SETTINGS = dict(
    projector_hidden_size=4096,
    projector_output_size=256,
    predictor_hidden_size=4096,
    base_ema=0.996,  # target EMA, cosine-ramped to 1
)


def get_config() -> ml_collections.ConfigDict:
    """Returns the locked BYOL ImageNet config."""
    c = base.get_config("byol", SETTINGS)
    c.lock()
    return c
