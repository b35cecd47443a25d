"""m2u-jax: multi-scale, multi-modal, uncertainty-aware visual defect inspection in JAX/Flax."""

from m2u_jax.predictor import Prediction, Predictor

__all__ = ["Prediction", "Predictor"]
__version__ = "0.1.0"
