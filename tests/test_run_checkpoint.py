"""Unit tests of m2u_jax.run_checkpoint helpers (the resume and restore paths themselves are
exercised end to end in test_reliability_training.py)."""

import asyncio
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from m2u_jax import run_checkpoint
from m2u_jax.train_state import TrainState


def _raised(call):
    """(type, error, traceback) of the exception `call()` raises."""
    try:
        call()
    except Exception as error:  # noqa: BLE001 - any error is the value under test
        return type(error), error, error.__traceback__
    raise AssertionError("expected an exception")


def _late_send():
    """A call that fails as tensorstore's late read does after orbax's asyncio loop closed:
    asyncio's own error for a callback handed to a closed loop."""
    loop = asyncio.new_event_loop()
    loop.close()
    return lambda: loop.call_soon_threadsafe(print)


def _other_send():
    """A call raising the same message from anywhere else (our own raise): never dropped."""

    def fail():
        raise RuntimeError("Event loop is closed")

    return fail


def _late_callback_report():
    """(type, error, traceback) of the late read's report."""
    return _raised(_late_send())


def _other_closed_loop_error():
    """(type, error, traceback) of the same message raised elsewhere."""
    return _raised(_other_send())


def test_late_read_callbacks_are_dropped_and_nothing_else(monkeypatch):
    reached = []
    monkeypatch.setattr(sys, "excepthook", lambda kind, error, trace: reached.append(error))
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # undone after the test

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


class _Unraisable:
    """Calls `send` when collected: an error there cannot be raised, so CPython hands it to
    `sys.unraisablehook` (`PyErr_WriteUnraisable`), the same path tensorstore's C++ takes for a
    callback it cannot deliver; the default hook prints its traceback to stderr."""

    def __init__(self, send):
        self.send = send

    def __del__(self):
        self.send()


def _report_unraisable(send):
    _Unraisable(send)  # collected at once (no reference kept): `send` runs in __del__


def test_late_read_reports_through_the_unraisable_hook_are_dropped(monkeypatch, capsys):
    # CI (stop 48) printed a late report with the excepthook filter in place: tensorstore also
    # reports through PyErr_WriteUnraisable, which reaches sys.unraisablehook instead.
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    _report_unraisable(_late_send())
    printed = capsys.readouterr().err
    assert "call_soon_threadsafe" in printed and "RuntimeError: Event loop is closed" in printed

    run_checkpoint._drop_late_read_callbacks()
    _report_unraisable(_late_send())
    assert capsys.readouterr().err == ""

    _report_unraisable(_other_send())
    printed = capsys.readouterr().err
    assert "RuntimeError: Event loop is closed" in printed and "fail" in printed


def test_resume_filters_late_read_reports_before_it_reads(monkeypatch, tmp_path):
    # A failed read's late reports can arrive before its error reaches resume_meta's handler
    # (seen once on a loaded machine), so the filter must be in place before the first read.
    reached = []
    monkeypatch.setattr(sys, "excepthook", lambda kind, error, trace: reached.append(error))
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # undone after the test
    manager = run_checkpoint.make_manager(str(tmp_path), keep=1, async_save=False)
    try:
        assert run_checkpoint.resume_meta(manager) is None  # no checkpoint: nothing read
    finally:
        manager.close()
    assert getattr(sys.excepthook, "drops_late_read_callbacks", False)
    assert getattr(sys.unraisablehook, "drops_late_read_callbacks", False)
    sys.excepthook(*_late_callback_report())
    assert reached == []


def test_a_late_read_needs_both_the_message_and_the_closed_loop_frame():
    _, late_error, late_trace = _late_callback_report()
    _, other_error, other_trace = _other_closed_loop_error()
    assert run_checkpoint._is_late_read_callback(late_error, late_trace)
    assert not run_checkpoint._is_late_read_callback(late_error, None)
    assert not run_checkpoint._is_late_read_callback(late_error, other_trace)
    assert not run_checkpoint._is_late_read_callback(ValueError("x"), late_trace)
    assert not run_checkpoint._is_late_read_callback(None, late_trace)


def test_restore_state_follows_the_metric_names_the_checkpoint_holds(tmp_path):
    """A state saved with metrics (loss, old_term) restores into a layout expecting (loss,
    new_term): loss keeps its saved sum and flag, new_term starts at zero, old_term is dropped;
    params and step come back unchanged."""
    optimizer = optax.sgd(0.1)
    params = {"w": jnp.arange(3.0)}
    saved = TrainState.create(params, optimizer, jax.random.key(0), ("loss", "old_term"))
    saved = saved.replace(
        step=jnp.array(7, jnp.int32),
        metric_sums={"loss": jnp.array(2.5), "old_term": jnp.array(4.0)},
        nonfinite_terms={"loss": jnp.array(1, jnp.int32), "old_term": jnp.array(1, jnp.int32)},
    )
    manager = run_checkpoint.make_manager(str(tmp_path), 2, async_save=False)
    run_checkpoint.save(manager, 7, saved, {"stage": "finetune", "stage_step": 7})
    manager.wait_until_finished()

    fresh = TrainState.create(params, optimizer, jax.random.key(1), ("loss", "new_term"))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = run_checkpoint.abstract_like(fresh, jax.tree.map(lambda _: sharding, fresh))
    restored = run_checkpoint.restore_state(manager, 7, abstract)
    manager.close()
    assert set(restored.metric_sums) == {"loss", "new_term"}
    assert float(restored.metric_sums["loss"]) == 2.5
    assert float(restored.metric_sums["new_term"]) == 0.0
    assert restored.metric_sums["new_term"].dtype == jnp.float32
    assert {name: int(flag) for name, flag in restored.nonfinite_terms.items()} == {
        "loss": 1,
        "new_term": 0,
    }
    assert int(restored.step) == 7
    np.testing.assert_array_equal(restored.params["w"], [0.0, 1.0, 2.0])
