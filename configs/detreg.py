"""DETReg, DETR variant (Bar et al., CVPR 2022): the official ImageNet recipe
(amirbar/DETReg configs/DETReg_top30_in_detr.sh) on a frozen detcon torso.

Run (records with region priors: scripts/generate_fh_masks.py --region_priors):
  python -m detcon.main_loop --config=configs/detreg.py --dataset_directory=/data/imagenet-fh-ss \
      --config.detreg.backbone_checkpoint=/ckpt/detcon_b --workdir=/ckpt/detreg
Smoke run on synthetic data (random frozen torso):
  python -m detcon.main_loop --config=configs/detreg.py --mock_data --max_steps=2 \
      --batch_size=8 --config.model.depth=10 --config.data.image_size=64 --workdir=/tmp/w
Export for facebookresearch/detr:
  python scripts/export_checkpoint.py --checkpoint=/tmp/w --format=detr --output=/tmp/w/detr.pth

Numbers and their files (amirbar/DETReg a4b6363 unless named):
- configs/DETReg_top30_in_detr.sh: --model detr --max_prop 30 --object_embedding_loss
  --object_embedding_coef 1 --lr_backbone 0 (frozen torso) --pre_norm --epochs 60.
- util/default_args.py: 'detr' defaults lr 1e-4, lr_drop 200, dim_feedforward 2048,
  num_queries 100, set_cost_class 1, cls_loss_coef 1; weight_decay 1e-4, clip_max_norm 0.1,
  enc/dec layers 6, hidden_dim 256, nheads 8, dropout 0.1, set_cost_bbox 5, set_cost_giou 2,
  bbox_loss_coef 5, giou_loss_coef 2, eos_coef 0.1, dataset_file coco.
- models/__init__.py: dataset_file 'coco' -> num_classes 91, so class_embed has 92 outputs;
  datasets/selfdet.py labels every region 1.
- README (training on 8 GPUs x 24 images): global batch 192.
- main.py: torch.optim.AdamW (betas 0.9/0.999, eps 1e-8), StepLR(lr_drop) per epoch.
- datasets/selfdet.py: images at most 600 px on the long side, crops resized to 128 px.
Departures (docs/detreg.md): a fixed S x S canvas (S = config.data.image_size, 600 = the
official maximum side) instead of padding to the batch maximum; crop side scaled with the canvas
below 600 px (detcon.methods.detreg.crop_side); the frozen torso is any detcon checkpoint
(official: SwAV R50); the sine encoding is DETReg's (coordinates - 0.5), not DETR's.
"""

import ml_collections

from configs import base

SETTINGS = dict(
    num_regions=30,  # top-30 region priors per image (--max_prop 30)
    num_queries=100,
    num_classes=91,  # class_embed outputs num_classes + 1 (no object last)
    hidden_dim=256,
    num_heads=8,
    num_encoder_layers=6,
    num_decoder_layers=6,
    dim_feedforward=2048,
    dropout=0.1,
    pre_norm=True,
    set_cost_class=1.0,
    set_cost_bbox=5.0,
    set_cost_giou=2.0,
    cls_loss_coef=1.0,
    bbox_loss_coef=5.0,
    giou_loss_coef=2.0,
    object_embedding_coef=1.0,
    eos_coef=0.1,
    crop_size=0,  # region crop side; 0: 128 px scaled with the canvas (crop_side)
    backbone_checkpoint="",  # the frozen torso: a run's workdir, .npz or DeepMind file
)


def get_config() -> ml_collections.ConfigDict:
    """Returns the locked DETReg (DETR variant) ImageNet config."""
    c = base.get_config("detreg", SETTINGS)
    c.data.image_size = 600  # the canvas: selfdet.py's max_size
    c.training.batch_size = 192
    c.training.pretrain_epochs = 60
    c.optim = ml_collections.ConfigDict(
        dict(
            name="adamw",
            base_learning_rate=1e-4,  # not scaled by the batch, as DETR's lr
            weight_decay=1e-4,
            clip_norm=0.1,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            lr_drop_epochs=200,  # StepLR x0.1; after the 60 epochs, so never reached
            frozen_prefix="res_net",  # the torso: no updates, no Adam state (--lr_backbone 0)
            # Unused by adamw; kept so the shared warm-up code and overrides still resolve.
            warmup_rule="fraction",
            warmup_epochs=0,
            warmup_fraction=0.0,
            trust_coefficient=1e-3,
            momentum=0.9,
        )
    )
    c.lock()
    return c
