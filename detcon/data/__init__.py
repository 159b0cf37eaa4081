"""Input data: TFRecord schema, tf.data pipeline, demo dataset (the only TensorFlow users)."""
