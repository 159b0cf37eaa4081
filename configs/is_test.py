"""The official smoke test: one DetCon-B step, ResNet-50 at 224 px, batch 4, on mock data.

Run (what `--is_test` selects; the batch rounds up to one example per device when there are
more than 4 devices):
  python -m detcon.main_loop --is_test
  python -m detcon.main_loop --config=configs/is_test.py --workdir=/tmp/detcon_is_test
"""

import ml_collections

from configs import detcon_b


def get_config() -> ml_collections.ConfigDict:
    """Returns DetCon-B's recipe cut to one step of batch 4 on mock data."""
    c = detcon_b.get_config()
    c.training.batch_size = 4
    c.training.mock_data = True
    c.training.max_steps = 1
    c.training.log_every_steps = 1
    return c
