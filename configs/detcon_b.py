"""DetCon-B on ImageNet: the official recipe (ResNet-50, 224 px, global batch 4096, 1000 epochs).

Run:
  python -m detcon.main_loop --config=configs/detcon_b.py \
      --dataset_directory=/data/imagenet-fh --workdir=/ckpt/detcon_b --pretrain_epochs=1000
Smoke run on synthetic data:
  python -m detcon.main_loop --config=configs/detcon_b.py --mock_data --max_steps=2 \
      --batch_size=8 --config.model.depth=10 --config.data.image_size=64 --workdir=/tmp/w

Numbers from google-deepmind/detcon detcon_b_config.py and detcon_b.py.
"""

import ml_collections

from configs import base

SETTINGS = dict(
    projector_hidden_size=4096,
    projector_output_size=256,
    predictor_hidden_size=4096,
    temperature=0.1,
    num_samples=16,  # masks sampled per image and view
    max_mask_id=256,  # ids per view renumbered below this; more segments fold into the last
    base_ema=0.996,  # target EMA, cosine-ramped to 1
)


def get_config() -> ml_collections.ConfigDict:
    """Returns the locked DetCon-B ImageNet config."""
    c = base.get_config("detcon_b", SETTINGS)
    # The released pretrain_common.py warms up for (num_epochs // 100) epochs of steps (10 of
    # 1000: 3,127 steps at batch 4096); its warmup_epochs key is never read.
    c.optim.warmup_rule = "released"
    c.lock()
    return c
