"""m2u_jax.host_memory: freed blocks stay in the process (no page faults to reuse them)."""

import json
import os
import platform
import subprocess
import sys

import pytest

from m2u_jax import host_memory

# In a fresh interpreter: optionally keep freed memory, then allocate, fill and free a 64 MiB
# block (above glibc's largest mmap threshold) eight times, counting the minor page faults of
# each round after the first. Run in a subprocess: the settings last for the process's life.
_PROBE = """
import ctypes, json, resource, sys
from m2u_jax import host_memory
applied = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else None
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(dict(applied=applied, faults=faults[1:])))
"""

_PAGES = (64 << 20) // 4096  # 16,384 pages of 4 KiB per round


def _probe(mode: str, env_value: str | None = None) -> dict:
    env = dict(os.environ)
    env.pop(host_memory.ENV_VAR, None)
    if env_value is not None:
        env[host_memory.ENV_VAR] = env_value
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(done.stdout)


GLIBC = platform.libc_ver()[0] == "glibc"
glibc_only = pytest.mark.skipif(not GLIBC, reason="glibc's malloc")


def test_a_c_library_without_mallopt_is_left_alone(monkeypatch):
    # musl and macOS have no mallopt: the call reports False instead of raising.
    class NoMallopt:
        pass

    monkeypatch.setattr(host_memory.ctypes, "CDLL", lambda name: NoMallopt())
    assert host_memory.keep_freed_memory() is False


@glibc_only
def test_default_malloc_faults_a_large_block_back_in_every_round():
    result = _probe("default")
    assert result["applied"] is None
    # Every round maps the block afresh: (nearly) one fault per page.
    assert all(count >= 0.9 * _PAGES for count in result["faults"]), result


@glibc_only
def test_kept_memory_is_reused_without_page_faults():
    result = _probe("keep")
    assert result["applied"] is True
    # The freed block stays in the heap: the later rounds touch pages already mapped.
    assert sum(result["faults"]) < 0.02 * _PAGES, result


@glibc_only
def test_the_environment_variable_keeps_the_system_defaults():
    result = _probe("keep", env_value="system")
    assert result["applied"] is False
    assert all(count >= 0.9 * _PAGES for count in result["faults"]), result
