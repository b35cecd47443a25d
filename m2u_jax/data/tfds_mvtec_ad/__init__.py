"""TFDS builder `mvtec_ad` (one config per category, from a manually downloaded copy) and the
reader that feeds its prepared data to the m2u-jax pipeline. Its modules import TensorFlow
Datasets, so only the `tfds` data format imports them."""
