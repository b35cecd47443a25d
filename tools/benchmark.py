"""`python tools/benchmark.py` (the command tools/gpu_check.sh runs): the same program as
`m2u-benchmark` (m2u_jax/cli/benchmark.py, which documents the options)."""

import sys

from m2u_jax.cli.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
