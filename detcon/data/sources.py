"""Where labelled images come from, as a plain value (no TensorFlow: the probes' options hold one)."""

from typing import NamedTuple, Optional


class Source(NamedTuple):
    """Where labelled images come from: a TFRecord directory, or a TFDS name (+ data_dir)."""

    directory: str = ""
    tfds_name: str = ""
    tfds_data_dir: Optional[str] = None
    tfds_train_split: str = "train"
    tfds_eval_split: str = ""  # empty: 'validation' if the dataset has one, else 'test'

    def describe(self) -> str:
        return f"tfds:{self.tfds_name}" if self.tfds_name else self.directory
