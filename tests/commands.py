"""The environment of the project's command-line tools run as subprocesses in tests."""

import os


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
