"""Evaluate a trained run: metrics.json, report.md with plots, review_queue.jsonl in DIR/eval.

python eval.py --config configs/tiny.py --workdir /tmp/m2u_tiny [--step N]
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from m2u_jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by train.py.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: latest).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    config = _CONFIG.value
    try:
        config_lib.validate(config)
    except config_lib.ConfigError as error:
        print(f"eval.py: bad config: {error}", file=sys.stderr)
        return 2
    from m2u_jax import cpu_prng

    # Loop-free threefry on CPU: the same dropout bits, ~1.5x faster MC dropout on the demo
    # (docs/performance.md); a no-op on GPU/TPU and on JAX versions without the hook.
    cpu_prng.install()
    try:
        from m2u_jax import evaluate
    except ImportError:
        print("eval.py: evaluation is not built yet (see the Evaluation issue).", file=sys.stderr)
        return 1
    from m2u_jax.data.records import DataError

    try:
        evaluate.evaluate(config, _WORKDIR.value, step=_STEP.value)
    except config_lib.ConfigError as error:  # checks that need the devices (batch split)
        print(f"eval.py: bad config: {error}", file=sys.stderr)
        return 2
    except (FileNotFoundError, DataError) as error:  # no checkpoint / bad file: names it
        print(f"eval.py: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=config_lib.flags_parser_for("eval.py"))
