"""Input data: TFRecord schema, tf.data pipeline, demo and synthetic-scenes datasets (the only
TensorFlow users)."""
