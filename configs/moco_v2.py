"""MoCo v2 on ImageNet: the official recipe (ResNet-50, 224 px, batch 256, 200 epochs).

Run:
  python -m detcon.main_loop --config=configs/moco_v2.py \
      --dataset_directory=/data/imagenet-fh --workdir=/ckpt/moco_v2 --pretrain_epochs=200
Smoke run on synthetic data (the queue must hold whole global batches):
  python -m detcon.main_loop --config=configs/moco_v2.py --mock_data --max_steps=2 \
      --batch_size=8 --config.model.depth=10 --config.data.image_size=64 \
      --config.moco_v2.queue_size=64 --workdir=/tmp/w_moco_v2

Numbers from facebookresearch/moco (commit 132aea9): moco/builder.py (K 65536, m 0.999, MLP head
2048 -> 2048 -> 128 without BatchNorm, per-GPU BN in the query encoder, shuffle BN in the key
encoder), main_moco.py (SGD momentum 0.9, weight decay 1e-4 on all parameters, lr 0.03 at
batch 256, no warm-up, cosine; --aug-plus augmentations: crop area 0.2-1, jitter
0.4/0.4/0.4/0.1 p 0.8, grayscale 0.2, blur p 0.5, flip) and README (--moco-t 0.2 for v2).
Views as main_moco.py --aug-plus builds them with torchvision: RandomResizedCrop(224,
scale=(0.2, 1.)) (torchvision/transforms/transforms.py get_params: 10 tries, then a centre crop;
bilinear; config.data.crop_sampler "torchvision"), ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8
(torchvision/transforms/_functional_tensor.py semantics: multiplicative brightness, grey-mean
contrast, grey-blend saturation, random order; detcon.ops.augment.MOCO_V2_VIEW), RandomGrayscale
0.2, moco/loader.py GaussianBlur (PIL, sigma 0.1-2, p 0.5, edges extended), flip.
Initialisation: torchvision/models/resnet.py (Kaiming-normal fan_out convs, BatchNorm scale 1,
no zero-init residual) and PyTorch's default nn.Linear for the MLP head (config.model.init).
One device: the official code refuses to run without DistributedDataParallel; here shuffle BN is
emulated by split BatchNorm over shuffle_bn_groups groups (MoCo's single-GPU demo,
detcon.methods.moco).
Departures: the learning rate is scaled linearly with the batch (0.03 x B/256, as MoCo's README
advises by hand), and the cosine steps every update rather than once per epoch.
"""

import ml_collections

from configs import base

SETTINGS = dict(
    projector_hidden_size=2048,
    projector_output_size=128,
    temperature=0.2,
    queue_size=65_536,  # a multiple of the global batch
    momentum=0.999,  # key encoder, constant
    query_batch_norm="per_device",  # or "cross_replica"
    key_batch_norm="shuffle",  # or "cross_replica"
    # One device: shuffle BN emulated by split BatchNorm over this many groups of the shuffled
    # key batch (MoCo's single-GPU demo uses 8); must divide the batch.
    shuffle_bn_groups=8,
)


def moco_recipe(c: ml_collections.ConfigDict) -> None:
    """MoCo v2's optimiser, batch, epochs and crop scale, shared by DenseCL and DetCo."""
    c.optim.name = "sgd"
    c.optim.base_learning_rate = 0.03  # x B/256
    c.optim.warmup_rule, c.optim.warmup_fraction = "fraction", 0.0  # MoCo warms up not at all
    c.optim.weight_decay = 1e-4
    c.optim.momentum = 0.9
    c.training.batch_size = 256
    c.training.pretrain_epochs = 200
    c.data.crop_min_area = 0.2
    c.model.init = "torchvision"  # torchvision.models.resnet50(), as moco/builder.py builds it
    c.data.crop_sampler = "torchvision"  # RandomResizedCrop(224, scale=(0.2, 1.0)), bilinear


def get_config() -> ml_collections.ConfigDict:
    """Returns the locked MoCo v2 ImageNet config."""
    c = base.get_config("moco_v2", SETTINGS)
    moco_recipe(c)
    c.lock()
    return c
