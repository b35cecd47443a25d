"""Two CPU processes on localhost train the tiny config as one jax.distributed job.

Each process has 2 fake CPU devices, so the global mesh spans 4 devices over both processes;
each reads its own half of every batch, and the cross-process reductions (gradients, the
contrastive loss over the global batch) run over jax 0.10's default CPU collectives (gloo; no
`jax_cpu_collectives_implementation` setting is needed).
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # starts several JAX processes

_REPO = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_train_the_tiny_config(tiny_synthetic_root, tmp_path):
    workdir = tmp_path / "run"
    coordinator = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ)
    env.update(
        # Unoptimised XLA code: compiling dominates a 2-step run.
        XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
        " --xla_llvm_disable_expensive_passes=true",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    processes = []
    for process_id in range(2):
        command = [
            sys.executable,
            str(_REPO / "train.py"),
            "--config",
            str(_REPO / "configs" / "tiny.py"),
            "--workdir",
            str(workdir),
            f"--config.data.root={tiny_synthetic_root}",
            # SimCLR only: NT-Xent over a global batch split across the processes is the most
            # cross-process step there is, and its program compiles fastest.
            "--config.train.pretrain_steps=2",
            "--config.train.finetune_steps=0",
            "--multihost",
            "--coordinator",
            coordinator,
            "--num_processes=2",
            f"--process_id={process_id}",
        ]
        log = open(tmp_path / f"process_{process_id}.log", "w")
        processes.append(
            (subprocess.Popen(command, cwd=_REPO, env=env, stdout=log, stderr=log), log)
        )
    try:
        codes = [process.wait(timeout=600) for process, _ in processes]
    finally:
        for process, log in processes:
            if process.poll() is None:
                process.kill()
            log.close()
    logs = [(tmp_path / f"process_{index}.log").read_text() for index in range(2)]
    assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    for index, log in enumerate(logs):
        assert f"process {index} of 2, 2 local / 4 global devices" in log
        assert "mesh {'data': 4, 'fsdp': 1} over 4 of 4 devices on 2 processes" in log
        assert "pretrain step 2/2 (global 2/2)" in log
    # Process 0 writes the logs; the checkpoint holds both processes' shards.
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [2]
    # NT-Xent of 8 examples starts near log(2 * 8 - 1) = 2.7 and must be finite.
    assert 0 < records[0]["pretrain/loss"] < 10
    assert np.isfinite(records[0]["pretrain/grad_norm"])
    steps = sorted(int(path.name) for path in (workdir / "checkpoints").iterdir())
    assert steps == [2]
    assert (workdir / "config.json").exists()
