"""`python tools/convert_to_onnx/convert.py` (the design card's export entry point): the same
program as `m2u-export` (m2u_jax/cli/export.py, which documents the options)."""

import sys

from m2u_jax.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
