"""A CPU-friendly DetCon-B demo: ResNet-18 at 96 px on the embedded scikit-image photos.

Run (builds the demo dataset on first use, no download):
  python -m detcon.main_loop --config=configs/demo.py --workdir=/tmp/detcon_demo
Smoke run on synthetic data:
  python -m detcon.main_loop --config=configs/demo.py --mock_data --workdir=/tmp/w --max_steps=4
"""

import ml_collections

from configs import detcon_b


def get_config() -> ml_collections.ConfigDict:
    """Returns the demo config: detcon_b with a small network, image and batch."""
    c = detcon_b.get_config()
    c.model.depth = 18
    c.detcon_b.projector_hidden_size = 512
    c.detcon_b.projector_output_size = 128
    c.detcon_b.predictor_hidden_size = 512
    c.data.demo = True
    c.data.image_size = 96
    c.data.shuffle_buffer = 256
    c.optim.base_learning_rate = 0.2
    c.optim.warmup_rule = "fraction"  # 50 epochs: the released rule would give no warm-up
    c.optim.warmup_fraction = 0.05
    c.training.batch_size = 16
    c.training.pretrain_epochs = 50
    c.training.checkpoint_every_steps = 50
    c.training.log_every_steps = 5
    c.training.log_tensors_interval = 30.0
    return c
