"""Train M2U-InspectNet: contrastive pretraining, then multi-task fine-tuning, then (with
`eval.after_training`) the evaluation of the final checkpoint into WORKDIR/eval, as eval.py.

python train.py --config configs/tiny.py --workdir /tmp/m2u_tiny [--config.train.batch_size=16]
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from m2u_jax import config as config_lib
from m2u_jax import host_memory
from m2u_jax.cli import folder_problem

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, config.json.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() (TPU pods, SLURM, explicit flags)."
)
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    config = _CONFIG.value
    try:
        config_lib.validate(config)
    except config_lib.ConfigError as error:
        print(f"train.py: bad config: {error}", file=sys.stderr)
        return 2
    # Before anything is built: a workdir that is a file, or cannot be listed or written.
    problem = folder_problem(_WORKDIR.value, "--workdir", read=True)
    if problem:
        print(f"train.py: bad config: {problem}", file=sys.stderr)
        return 2
    from m2u_jax import cpu_prng

    # Loop-free threefry on CPU: the same dropout bits, ~1.5x faster MC dropout on the demo
    # (docs/performance.md); a no-op on GPU/TPU and on JAX versions without the hook.
    cpu_prng.install()
    # After validation: a bad config fails before jax starts.
    from absl import logging

    from m2u_jax import evaluate, trainer, validation
    from m2u_jax.data.records import DataError

    try:
        trainer.main(
            config,
            _WORKDIR.value,
            multihost=_MULTIHOST.value,
            coordinator=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
            make_validator=validation.make_validator,
        )
    except trainer.NonFiniteLossError as error:
        print(f"train.py: {error}", file=sys.stderr)
        return 1
    # Disk full (...) mid-run: names the step and the last complete checkpoint, kept intact.
    except trainer.run_checkpoint.CheckpointWriteError as error:
        print(f"train.py: {error}", file=sys.stderr)
        return 1
    except trainer.run_checkpoint.UnreadableCheckpointError as error:  # no intact one to resume
        print(f"train.py: {error}", file=sys.stderr)
        return 2
    except config_lib.ConfigError as error:  # checks that need the devices (batch split)
        print(f"train.py: bad config: {error}", file=sys.stderr)
        return 2
    except DataError as error:  # names the file and the problem
        print(f"train.py: bad data: {error}", file=sys.stderr)
        # Exit now: releasing a tf.data pipeline whose map workers failed can deadlock (its
        # iterator waits for them while holding the GIL they need). The trainer has already
        # closed its checkpoint manager and logs.
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(2)
    except PermissionError as error:  # a file of the run that cannot be written mid-run
        print(f"train.py: cannot write {error.filename}: {error.strerror}", file=sys.stderr)
        return 1
    if config.eval.after_training and config.train.finetune_steps > 0:
        metrics = evaluate.evaluate(config, _WORKDIR.value)
        logging.info(
            "summary eval: image AUROC %.4f, pixel AUROC %.4f, box mAP@0.5 %.4f (%s/eval)",
            metrics["image"]["auroc"],
            metrics["pixel"]["auroc"],
            metrics["detection"]["map50"],
            _WORKDIR.value,
        )
    return 0


def run() -> None:
    """Console-script entry point (`m2u-train`)."""
    # First, before JAX's and TensorFlow's threads start: freed blocks stay in the process
    # instead of being faulted back in every step (m2u_jax/host_memory.py).
    host_memory.keep_freed_memory()
    # TensorFlow's C++ warnings (before TF loads): a bad file met by the input pipeline is
    # otherwise logged with two Python tracebacks before train.py's own line names it.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app.run(main, flags_parser=config_lib.flags_parser_for("train.py"))


if __name__ == "__main__":
    run()
