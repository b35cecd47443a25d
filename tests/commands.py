"""The environment of the project's command-line tools run as subprocesses in tests."""

import os
import re


def subprocess_env(**changes) -> dict:
    """This run's environment (tests/conftest.py: 8 fake devices, fast-compiling XLA, the run's
    compilation cache, quiet TensorFlow) with `changes` applied; a value of None removes the
    name."""
    environment = dict(os.environ)
    for name, value in changes.items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = str(value)
    return environment


def fake_devices_env(count: int, **changes) -> dict:
    """`subprocess_env` with `count` fake CPU devices instead of the run's 8."""
    flags = re.sub(
        r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")
    )
    flags = f"{flags.strip()} --xla_force_host_platform_device_count={count}".strip()
    return subprocess_env(**{"XLA_FLAGS": flags, **changes})


def one_device_env(**changes) -> dict:
    """`subprocess_env` with one CPU device, as a laptop runs the tools: for subprocess tests of
    what does not depend on the mesh (command lines, kill and resume, error paths). The sharded
    paths are tested in-process on 8 devices (tests/test_trainer.py, test_sharding.py) and in
    subprocesses on 2 (test_trainer.py's train.py runs, test_multihost.py); one device compiles
    and checkpoints a third faster."""
    return fake_devices_env(1, **changes)
