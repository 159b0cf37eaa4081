"""DenseCL on ImageNet: the official 200-epoch recipe (ResNet-50, 224 px, batch 256).

Run:
  python -m detcon.main_loop --config=configs/densecl.py \
      --dataset_directory=/data/imagenet-fh --workdir=/ckpt/densecl --pretrain_epochs=200
Smoke run on synthetic data (the queues must hold whole global batches):
  python -m detcon.main_loop --config=configs/densecl.py --mock_data --max_steps=2 \
      --batch_size=8 --config.model.depth=10 --config.data.image_size=64 \
      --config.densecl.queue_size=64 --workdir=/tmp/w_densecl
Export for detectron2 (DenseCL's official fine-tuning configs):
  python scripts/export_checkpoint.py --checkpoint=/ckpt/densecl --format=detectron2 \
      --output=densecl_r50.pkl

Numbers from WXinlong/DenseCL: configs/selfsup/densecl/densecl_imagenet_200ep.py (queue 65536
global + 65536 dense, momentum 0.999, loss_lambda 0.5, temperature 0.2, SGD lr 0.03 momentum 0.9
weight decay 1e-4, cosine annealing, MoCo v2 augmentations), openselfsup/models/necks.py
DenseCLNeck (global 2048 -> 2048 -> 128 and dense 1x1 conv 2048 -> 2048 -> 128, biases, no
BatchNorm, on the 7 x 7 C5 grid), openselfsup/models/densecl.py (matches by backbone cosine
similarity, dense queue of pooled dense keys) and openselfsup/hooks/densecl_warmup_hook.py
(lambda 0 for a warm-up; no released config enables it, so dense_warmup_steps defaults to 0).
Views: the config's train_pipeline is MoCo v2's torchvision pipeline (configs/moco_v2.py:
RandomResizedCrop scale 0.2-1, ColorJitter 0.4/0.4/0.4/0.1, openselfsup
datasets/pipelines/transforms.py GaussianBlur with PIL, edges extended).
Initialisation (config.model.init "densecl"): openselfsup/models/backbones/resnet.py
init_weights (convs mmcv kaiming_init fan_in normal, BatchNorm 1, zero_init_residual False),
openselfsup/models/densecl.py init_weights(init_linear='kaiming') with necks.py _init_weights
(the global neck's Linear layers Kaiming-normal fan_in, bias 0; the dense neck's 1x1 convs keep
PyTorch's default).
"""

import ml_collections

from configs import base, moco_v2

SETTINGS = dict(
    moco_v2.SETTINGS,
    dense_hidden_size=2048,
    dense_weight=0.5,  # lambda: (1 - lambda) global + lambda dense
    dense_warmup_steps=0,
)  # lambda = 0 for this many first steps (official hook: 1000)


def get_config() -> ml_collections.ConfigDict:
    """Returns the locked DenseCL ImageNet config."""
    c = base.get_config("densecl", SETTINGS)
    moco_v2.moco_recipe(c)
    c.model.init = "densecl"  # openselfsup ResNet.init_weights and DenseCL.init_weights
    c.lock()
    return c
