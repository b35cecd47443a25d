"""Every key with its default and a one-line comment: m2u_jax/default_config.py (the library's
own copy, so an installed package needs no `configs` folder). This file lets the tools take
`--config configs/default.py` like the other configs."""

from m2u_jax.default_config import get_config

__all__ = ["get_config"]
