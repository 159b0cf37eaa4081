"""Self-supervised pretraining of ResNet backbones for detection and segmentation, in JAX/Haiku.

Eight methods (DetCon-B, DetCon-S, BYOL, SimCLR, MoCo v2, DenseCL, DetCo, and DETReg, which
pretrains a DETR detector on a frozen torso) are plug-ins of one trainer (`detcon.methods`).
`python -m detcon.main_loop` trains; `python -m detcon.evaluate` probes a frozen torso. The
README's Layout table maps the sub-packages.
"""
