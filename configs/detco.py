"""DetCo on ImageNet (ResNet-50, 224 px, batch 256, 200 epochs), after the paper.

Run:
  python -m detcon.main_loop --config=configs/detco.py \
      --dataset_directory=/data/imagenet-fh --workdir=/ckpt/detco --pretrain_epochs=200
Smoke run on synthetic data (the queues must hold whole global batches; 32 px patches give
1 x 1 final maps):
  python -m detcon.main_loop --config=configs/detco.py --mock_data --max_steps=2 \
      --batch_size=8 --config.model.depth=10 --config.data.image_size=64 \
      --config.detco.queue_size=64 --config.detco.patch_size=32 --workdir=/tmp/w_detco

DetCo's pretraining code was never released (xieenze/DetCo holds fine-tuning only). The recipe
is MoCo v2's (SGD lr 0.03 x B/256, momentum 0.9, weight decay 1e-4, cosine; m 0.999, queues of
65536, temperature 0.2, MoCo v2 augmentations), as in the unofficial port Qianna00/openselfsup
configs/selfsup/detco/r50_marvel.py. Heads as the port: per stage res2..res5, global
avgpool -> Linear(C, C) -> ReLU -> Linear(C, 128), local (the 9 patches' pooled features
concatenated) Linear(9C, C) -> ReLU -> Linear(C, 128), biases, no BatchNorm.
Objective: the paper's Eq. 1, sum_i w_i (L_g-g + L_l-l + L_g-l) with the three terms summed;
stage weights (0.1, 0.4, 0.7, 1.0) for res2..res5 as in shuuchen/DetCo.pytorch main_detco.py,
which adds the three terms with these weights (the paper, arXiv 2102.04803, gives the same
weights; Qianna00/openselfsup uses (0.1, 0.15, 0.3, 0.45)).
Departures from the port: the jigsaw cuts each augmented view
into a 3 x 3 grid resized to patch_size (the port draws patches from a separate 0.6-1 crop at
255 px, 85 px cells randomly cropped to 64 px, and uses hue 0.4); the patch order is not shuffled.
"""

import ml_collections

from configs import base, moco_v2

SETTINGS = dict(
    projector_output_size=128,
    temperature=0.2,
    queue_size=65_536,  # per queue: 4 global + 4 local
    momentum=0.999,
    query_batch_norm="per_device",
    key_batch_norm="shuffle",
    shuffle_bn_groups=8,  # one device: split BatchNorm groups emulating shuffle BN (moco_v2.py)
    stage_weights=(0.1, 0.4, 0.7, 1.0),  # res2..res5, the paper's
    patch_size=64,  # jigsaw cell side in pixels (the port's 64)
)


def get_config() -> ml_collections.ConfigDict:
    """Returns the locked DetCo ImageNet config."""
    c = base.get_config("detco", SETTINGS)
    moco_v2.moco_recipe(c)
    c.lock()
    return c
