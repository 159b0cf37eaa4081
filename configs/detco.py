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
65536, temperature 0.2), as in the unofficial port Qianna00/openselfsup
configs/selfsup/detco/r50_marvel.py, with MoCo v2's torchvision views (configs/moco_v2.py:
RandomResizedCrop(scale=(0.2, 1)), ColorJitter(0.4, 0.4, 0.4, 0.1), PIL blur) and torchvision's
ResNet initialisation (the port builds MoCo's encoders). Heads as the port: per stage res2..res5,
global avgpool -> Linear(C, C) -> ReLU -> Linear(C, 128), local (the 9 patches' pooled features
concatenated) Linear(9C, C) -> ReLU -> Linear(C, 128), biases, no BatchNorm.
Objective: the paper's Eq. 1, sum_i w_i (L_g-g + L_l-l + L_g-l) with the three terms summed;
stage weights (0.1, 0.4, 0.7, 1.0) for res2..res5 as in shuuchen/DetCo.pytorch main_detco.py,
which adds the three terms with these weights (the paper, arXiv 2102.04803, gives the same
weights; Qianna00/openselfsup uses (0.1, 0.15, 0.3, 0.45)).
Local branch as the paper's §3.4 and the port's MultiScaleContrastiveDataset
(openselfsup/datasets/contrastive.py): each view has its own crop of 60-100% of the image
(RandomResizedCrop(255, scale=(0.6, 1)), flipped), augmented whole, cut into a 3 x 3 grid of
85 px cells, a random 64 px window per cell, the nine shuffled. Sizes scale with patch_size P:
cells of round(85 P / 64) px, the crop 3 cells wide (P 64: 85 and 255 px; P 32: 43 and 129 px).
Departures: the port's patch jitter uses hue 0.4 (here MoCo v2's 0.1), and the colour
augmentation of the jigsaw crop runs on the accelerator at its J px like the views'.
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
