"""Input data: TFRecord schema, tf.data pipeline, demo and synthetic-scenes datasets (the only
TensorFlow users)."""

import os

# TensorFlow's C++ INFO and WARNING lines (the oneDNN notice, CPU feature guards, end-of-sequence
# chatter) are noise in a training log; only the level of what is printed changes, not numerics.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
