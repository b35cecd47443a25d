"""`python train.py` from a checkout: the same program as `m2u-train` (m2u_jax/cli/train.py)."""

from m2u_jax.cli.train import run

if __name__ == "__main__":
    run()
