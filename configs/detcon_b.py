"""DetCon-B on ImageNet: the official recipe (ResNet-50, 224 px, global batch 4096, 1000 epochs).

Run:
  python -m detcon.main_loop --config=configs/detcon_b.py \
      --dataset_directory=/data/imagenet-fh --workdir=/ckpt/detcon_b --pretrain_epochs=1000

Override any field with --config.<group>.<field>=value, e.g. --config.model.depth=200.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Returns the locked DetCon-B ImageNet config."""
    c = ml_collections.ConfigDict()
    c.method = "detcon_b"  # the objective; future methods (byol, detcon_s, ...) add a value here

    c.model = ml_collections.ConfigDict(dict(
        depth=50,
        width_multiplier=1,
        projector_hidden_size=4096,
        projector_output_size=256,
        predictor_hidden_size=4096,
        num_classes=-1,          # online linear probe; <= 0: the dataset's count (its manifest)
        bn_decay_rate=0.9,
        precision="float32",     # or "bfloat16": bf16 convs/matmuls, fp32 params/BN/loss
    ))
    c.loss = ml_collections.ConfigDict(dict(
        temperature=0.1,
        num_samples=16,          # masks sampled per image and view
        max_mask_id=256,         # ids >= this are ignored when building grid masks
    ))
    c.data = ml_collections.ConfigDict(dict(
        dataset_directory="",    # TFRecords from scripts/generate_fh_masks.py
        demo=False,              # build and use the embedded scikit-image demo dataset
        image_size=224,
        fh_mask_index=0,         # which FH scale of the record to use
        num_train_examples=-1,   # <= 0: the dataset's count (ImageNet train: 1,281,167)
        deterministic=False,     # True: identical losses on re-runs, at some input throughput
        shuffle_buffer=10_000,
        seed=0,
    ))
    c.optim = ml_collections.ConfigDict(dict(
        base_learning_rate=0.2,  # scaled by batch_size / 256
        warmup_fraction=0.01,    # warm-up of epochs/100 epochs
        weight_decay=1.5e-6,
        trust_coefficient=1e-3,
        momentum=0.9,
        base_ema=0.996,
    ))
    c.training = ml_collections.ConfigDict(dict(
        batch_size=4096,         # global, over all devices and hosts
        pretrain_epochs=1000,
        max_steps=-1,            # > 0 overrides the step count derived from epochs
        seed=0,
        mock_data=False,
        checkpoint_every_steps=1000,
        keep_checkpoints=3,
        log_every_steps=100,
        log_tensors_interval=60.0,  # seconds; also log at least this often
        init_checkpoint="",      # DeepMind .npy torso weights to start from (needs allow_pickle)
        allow_pickle=False,
        restore_step=-1,         # >= 0: resume from this checkpoint, later ones moved aside
        allow_config_change=False,  # resume although the schedule or data settings changed
    ))
    c.lock()
    return c
