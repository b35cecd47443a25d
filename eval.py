"""`python eval.py` from a checkout: the same program as `m2u-eval` (m2u_jax/cli/evaluate.py)."""

from m2u_jax.cli.evaluate import run

if __name__ == "__main__":
    run()
