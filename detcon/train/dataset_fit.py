"""Fits the config to the dataset: class count of the linear probe, examples per epoch."""

from typing import Optional

import numpy as np
from absl import logging

from detcon import errors

MOCK_NUM_CLASSES = 1000  # mock data has no dataset to ask; ImageNet's count, as the official test


def num_classes(configured: int, found: Optional[int], source: str) -> int:
    """The probe's class count: the dataset's, or the config's when > 0 and not too small."""
    if found is None:
        if configured > 0:
            logging.info("Classes: %d from --config.model.num_classes (%s).", configured, source)
            return configured
        raise errors.DatasetMismatchError(
            f"The dataset's class count is {source}; set --config.model.num_classes to the number "
            "of classes (or re-make the dataset with scripts/generate_fh_masks.py)."
        )
    if configured <= 0:
        count = max(found, 1)  # an unlabelled dataset (0 classes) still gets a 1-way probe
        logging.info("Classes: %d from %s.", count, source)
        return count
    if configured < found:
        raise errors.DatasetMismatchError(
            f"--config.model.num_classes={configured} but the dataset has {found} classes "
            f"({source}); set it to -1 to take the dataset's count."
        )
    logging.info(
        "Classes: %d from --config.model.num_classes (the dataset has %d, %s).",
        configured,
        found,
        source,
    )
    return configured


def num_examples(configured: int, found: int, source: str) -> int:
    """Examples per epoch: the dataset's, or the config's when > 0 (a disagreement is warned)."""
    if configured <= 0:
        logging.info("Examples per epoch: %d from %s.", found, source)
        return found
    if configured != found:
        logging.warning(
            "--config.data.num_train_examples=%d but the dataset holds %d examples "
            "(%s); using the configured %d. Set it to -1 to use the dataset's count.",
            configured,
            found,
            source,
            configured,
        )
    else:
        logging.info("Examples per epoch: %d (config, matches %s).", configured, source)
    return configured


def check_labels(labels: np.ndarray, classes: int) -> None:
    """Raises DatasetMismatchError if any label lies outside the probe's [0, classes)."""
    if labels.size and int(labels.max()) >= classes:
        raise errors.DatasetMismatchError(
            f"A batch holds label {int(labels.max())} but the probe has {classes} classes "
            "(--config.model.num_classes); set it to -1 to take the dataset's count."
        )
