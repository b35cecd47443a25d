"""Evaluate a trained run: metrics.json, report.md with plots, review_queue.jsonl in DIR/eval.

python eval.py --workdir DIR [--step N|best] [--config.eval.num_mc_samples=16 ...]

The run's own config (DIR/config.json) is the default; `--config FILE` replaces it. A key that
changes the parameter shapes is an error naming the key (the checkpoints would not fit).
"""

import os
import sys

from absl import app, flags

from m2u_jax import config as config_lib
from m2u_jax import host_memory
from m2u_jax.cli import checkpoint_step, folder_problem

_CONFIG = config_lib.define_config_flag("eval.py", sys.argv)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by train.py.")
_STEP = flags.DEFINE_string(
    "step", None, "Checkpoint step to evaluate, or 'best' (default: the run's best or newest)."
)
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    config = _CONFIG.value
    if os.path.isdir(_WORKDIR.value):  # else the config or checkpoint check names it
        try:
            os.listdir(_WORKDIR.value)
        except OSError as error:
            print(
                f"eval.py: --workdir {_WORKDIR.value}: cannot read it ({error.strerror})",
                file=sys.stderr,
            )
            return 2
    if config is None:
        print(
            f"eval.py: {_WORKDIR.value}/config.json not found: pass the run directory of "
            "train.py as --workdir, or a config file as --config",
            file=sys.stderr,
        )
        return 2
    try:
        config_lib.validate(config)
        config_lib.check_same_architecture(config, _WORKDIR.value)
    except config_lib.ConfigError as error:
        print(f"eval.py: bad config: {error}", file=sys.stderr)
        return 2
    try:
        step = checkpoint_step(_STEP.value)
    except ValueError:
        print(f"eval.py: --step {_STEP.value!r}: use a checkpoint step or 'best'", file=sys.stderr)
        return 2
    # Before the model is restored: the results go to WORKDIR/eval (a read-only finished run).
    if os.path.isdir(_WORKDIR.value):
        problem = folder_problem(os.path.join(_WORKDIR.value, "eval"), "evaluation folder")
        if problem:
            print(f"eval.py: {problem}", file=sys.stderr)
            return 2
    from m2u_jax import cpu_prng

    # Loop-free threefry on CPU: the same dropout bits, ~1.5x faster MC dropout on the demo
    # (docs/performance.md); a no-op on GPU/TPU and on JAX versions without the hook.
    cpu_prng.install()
    from m2u_jax import evaluate

    try:
        evaluate.evaluate(config, _WORKDIR.value, step=step)
    except config_lib.ConfigError as error:  # checks that need the devices (batch split)
        print(f"eval.py: bad config: {error}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as error:  # checkpoint, step or file: names it
        print(f"eval.py: {error}", file=sys.stderr)
        return 2
    except PermissionError as error:  # a file of WORKDIR/eval that cannot be written
        print(f"eval.py: cannot write {error.filename}: {error.strerror}", file=sys.stderr)
        return 1
    return 0


def run() -> None:
    """Console-script entry point (`m2u-eval`)."""
    host_memory.keep_freed_memory()  # first, before JAX's threads start (as train.py)
    app.run(main, flags_parser=config_lib.flags_parser_for("eval.py"))


if __name__ == "__main__":
    run()
