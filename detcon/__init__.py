"""DetCon-B self-supervised pretraining in JAX/Haiku."""
