"""m2u-jax: multi-scale, multi-modal, uncertainty-aware visual defect inspection in JAX/Flax."""

__version__ = "0.1.0"
