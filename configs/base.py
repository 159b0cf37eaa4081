"""What every method's config shares: torso, data, optimiser and training loop settings.

A method config calls `get_config(method, method_settings)` and overrides recipe fields; the
method's own fields live in the group named after it (config.<method>).
"""

import ml_collections


def get_config(method: str, method_settings: dict) -> ml_collections.ConfigDict:
    """The shared ImageNet defaults (ResNet-50, 224 px, batch 4096) plus `method`'s group."""
    c = ml_collections.ConfigDict()
    c.method = method  # a name registered in detcon.methods
    c[method] = ml_collections.ConfigDict(method_settings)

    c.model = ml_collections.ConfigDict(
        dict(
            depth=50,
            width_multiplier=1,
            num_classes=-1,  # online linear probe; <= 0: the dataset's count (its manifest)
            bn_decay_rate=0.9,
            # Initialisers of the release (detcon.models.networks.INIT_SCHEMES): "haiku" for the
            # DeepMind methods, "torchvision" for MoCo v2 and DetCo, "densecl" for DenseCL.
            init="haiku",
            precision="float32",  # or "bfloat16": bf16 convs/matmuls, fp32 params/BN/loss
            # Both views through each network as one batch (BatchNorm statistics still per view):
            # same numbers as one pass per view, larger GEMMs and half the kernel launches.
            one_pass_views=True,
            # Under bfloat16: BatchNorm statistics in fp32, normalise-scale-shift on bf16 activations.
            bf16_batch_norm=True,
        )
    )
    c.data = ml_collections.ConfigDict(
        dict(
            dataset_directory="",  # TFRecords from scripts/generate_fh_masks.py
            demo=False,  # build and use the embedded scikit-image demo dataset
            image_size=224,
            fh_mask_index=0,  # which FH scale of the record to use
            num_train_examples=-1,  # <= 0: the dataset's count (ImageNet train: 1,281,167)
            deterministic=False,  # True: identical losses on re-runs, at some input throughput
            shuffle_buffer=10_000,
            crop_min_area=0.08,  # smallest random crop, fraction of the image (MoCo family: 0.2)
            # The release's crop window and resize filter: "released" (DetCon/BYOL, bicubic),
            # "torchvision" (RandomResizedCrop, bilinear), "tf_distorted_bbox" (SimCLR, bicubic).
            crop_sampler="released",
            seed=0,
        )
    )
    c.optim = ml_collections.ConfigDict(
        dict(
            name="lars",
            base_learning_rate=0.2,  # scaled by batch_size / 256
            # 'released': (pretrain_epochs // 100) epochs (DetCon-B's config); 'epochs':
            # warmup_epochs epochs; 'fraction': round(warmup_fraction * total steps).
            warmup_rule="epochs",
            warmup_epochs=10,
            warmup_fraction=0.01,
            weight_decay=1.5e-6,
            trust_coefficient=1e-3,
            momentum=0.9,
        )
    )
    c.training = ml_collections.ConfigDict(
        dict(
            batch_size=4096,  # global, over all devices and hosts
            pretrain_epochs=1000,
            max_steps=-1,  # > 0 overrides the step count derived from epochs
            seed=0,
            mock_data=False,
            checkpoint_every_steps=1000,
            keep_checkpoints=3,
            log_every_steps=100,
            log_tensors_interval=60.0,  # seconds; also log at least this often
            init_checkpoint="",  # torso to start from: run workdir, .npz, DeepMind .npy/.pkl (allow_pickle)
            allow_pickle=False,
            restore_step=-1,  # >= 0: resume from this checkpoint, later ones moved aside
            allow_config_change=False,  # resume although the schedule or data settings changed
            compilation_cache=True,  # JAX's persistent cache in $DETCON_CACHE_DIR or ~/.cache/detcon/jax
        )
    )
    c.evaluation = ml_collections.ConfigDict(
        dict(
            every_steps=0,  # > 0: kNN top-1 on a validation split every N steps (off here:
            # a 1.28 M-image bank per evaluation is too slow for monitoring)
            dataset_directory="",  # labelled train/validation TFRecords; "" = the training data
            batch_size=256,
            knn_k=20,
            knn_temperature=0.07,
        )
    )
    return c
