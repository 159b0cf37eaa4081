"""kNN monitoring during pretraining: the online torso's weighted-kNN top-1 on a validation split.

The bank is the `train` split and the queries the `validation` split of
`config.evaluation.dataset_directory` (default: the training dataset's own directory), centre crops
at the pretraining image size. Every process computes the same number on the whole split.
"""

from typing import Callable, Optional

import jax
import ml_collections
import numpy as np

from detcon.data import labelled
from detcon.evaluation import features as features_lib
from detcon.evaluation import protocols
from detcon.weights import torso as torso_lib

Monitor = Callable[[dict, dict], dict[str, float]]


def evaluation_directory(
    config: ml_collections.ConfigDict, training_directory: Optional[str]
) -> str:
    """The labelled TFRecord directory to monitor on; a clear error if there is none."""
    directory = config.evaluation.dataset_directory or training_directory or ""
    if not directory:
        raise ValueError(
            "config.evaluation.every_steps > 0 needs labelled TFRecords: set "
            "--config.evaluation.dataset_directory (train and validation shards), "
            "or train on a dataset directory instead of --mock_data."
        )
    for split in labelled.TFRECORD_SPLITS:  # fail now, not at the first evaluation
        labelled.shards.list_shards(directory, split)
    return directory


def make_knn_monitor(
    config: ml_collections.ConfigDict, training_directory: Optional[str]
) -> Optional[Monitor]:
    """monitor(online params, online state) -> {'knn_top1': x}; None when every_steps <= 0."""
    if config.evaluation.every_steps <= 0:
        return None
    directory = evaluation_directory(config, training_directory)
    options = protocols.Options(
        source=labelled.Source(directory=directory),
        image_size=config.data.image_size,
        batch_size=config.evaluation.batch_size,
        knn_k=config.evaluation.knn_k,
        knn_temperature=config.evaluation.knn_temperature,
    )
    template = features_lib.random_init(config.model.depth, config.model.width_multiplier, 0)
    extractor = features_lib.Extractor(template)  # compiled once, reloaded at every evaluation

    def monitor(params: dict, state: dict) -> dict[str, float]:
        host = lambda tree: jax.tree_util.tree_map(np.asarray, tree)
        extractor.load(torso_lib.from_network(host(params), host(state), config.model))
        result = protocols.run_knn(extractor, options)
        return {"knn_top1": result["top1"]}

    return monitor
