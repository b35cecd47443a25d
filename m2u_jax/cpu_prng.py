"""Opt-in CPU speed-up of dropout's random numbers: lower threefry without loops on CPU.

JAX lowers its default PRNG (threefry2x32) on CPU as `while` loops over the hash rounds
("rolled", to keep the HLO small); on GPU/TPU it emits the rounds unrolled. On XLA's CPU backend
the loops cannot fuse with anything, so every dropout site becomes a chain of small loop
iterations: in the MC-dropout program of configs/demo.py they were ~40 % of the busy time and
most of its compile time (docs/performance.md). `install()` registers JAX's own unrolled
lowering (the one GPU/TPU use) for the CPU platform too. The generated bits are identical — the
same threefry rounds in the same order — so results, seeds and checkpoints do not change.

It touches a private JAX module (`jax._src.random.threefry2x32`), so it is opt-in and defensive:
on JAX versions without that module it does nothing and returns False. Call it before the first
program is traced (lowerings are looked up when a program is lowered).
"""

from __future__ import annotations


def install(unrolled: bool = True) -> bool:
    """Registers the unrolled threefry lowering for CPU (`unrolled=False` restores JAX's rolled
    one); True if the registration happened, False on JAX versions without the module."""
    try:
        from jax._src.interpreters import mlir
        from jax._src.random import threefry2x32
    except ImportError:
        return False
    primitive = getattr(threefry2x32, "threefry2x32_p", None)
    rule_name = "_threefry2x32_lowering_rule" if unrolled else "_threefry2x32_cpu_lowering_rule"
    rule = getattr(threefry2x32, rule_name, None)
    if primitive is None or rule is None:
        return False
    mlir.register_lowering(primitive, rule, platform="cpu")
    return True
