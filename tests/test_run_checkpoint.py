"""Unit tests of m2u_jax.run_checkpoint helpers that need no checkpoint on disk (the resume and
restore paths themselves are exercised end to end in test_reliability_training.py)."""

import asyncio
import sys

from m2u_jax import run_checkpoint


def _raised(call):
    """(type, error, traceback) of the exception `call()` raises."""
    try:
        call()
    except Exception as error:  # noqa: BLE001 - any error is the value under test
        return type(error), error, error.__traceback__
    raise AssertionError("expected an exception")


def _late_callback_report():
    """The report tensorstore prints when a read ends after orbax's asyncio loop closed: asyncio's
    own error for a callback handed to a closed loop."""
    loop = asyncio.new_event_loop()
    loop.close()
    return _raised(lambda: loop.call_soon_threadsafe(print))


def _other_closed_loop_error():
    """The same message from anywhere else (here: our own raise), which must not be dropped."""

    def fail():
        raise RuntimeError("Event loop is closed")

    return _raised(fail)


def test_late_read_callbacks_are_dropped_and_nothing_else(monkeypatch):
    reached = []
    monkeypatch.setattr(sys, "excepthook", lambda kind, error, trace: reached.append(error))

    late = _late_callback_report()
    assert run_checkpoint._is_late_read_callback(*late[1:])
    sys.excepthook(*late)
    assert len(reached) == 1, "before the filter, the report reaches the hook"

    run_checkpoint._drop_late_read_callbacks()
    run_checkpoint._drop_late_read_callbacks()  # idempotent: one filter, not two
    sys.excepthook(*late)
    assert len(reached) == 1, "the late callback's report is dropped"

    elsewhere = _other_closed_loop_error()
    assert not run_checkpoint._is_late_read_callback(*elsewhere[1:])
    sys.excepthook(*elsewhere)
    value_error = _raised(lambda: int("x"))
    sys.excepthook(*value_error)
    assert reached[1:] == [elsewhere[1], value_error[1]]


def test_a_late_read_needs_both_the_message_and_the_closed_loop_frame():
    _, late_error, late_trace = _late_callback_report()
    _, other_error, other_trace = _other_closed_loop_error()
    assert run_checkpoint._is_late_read_callback(late_error, late_trace)
    assert not run_checkpoint._is_late_read_callback(late_error, None)
    assert not run_checkpoint._is_late_read_callback(late_error, other_trace)
    assert not run_checkpoint._is_late_read_callback(ValueError("x"), late_trace)
    assert not run_checkpoint._is_late_read_callback(None, late_trace)
