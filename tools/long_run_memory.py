"""Long-run memory check: trains the tiny config for N steps on CPU and samples the process's
resident memory (VmRSS) every 100 steps, to catch leaks (host-side caches, retained device
buffers, growing logs) that a short test never sees.

python tools/long_run_memory.py --steps 2000 --every 100 [--data_root DIR] [--markdown]

Without --data_root a tiny synthetic dataset (32x32, the conftest one) is written to a temporary
folder. Criterion: after warm-up (the first 20% of the samples: compilation, tf.data buffers and
the decode cache fill up), RSS may never exceed the first post-warm-up sample by more than 10%. Exit
status 0 when it holds, 1 when it does not.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: make m2u_jax and configs importable
    sys.path.insert(0, str(REPO_ROOT))


def resident_memory_mb() -> float:
    """This process's resident set size in MiB, from /proc/self/status (Linux; no psutil)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0  # reported in kB
    raise RuntimeError("/proc/self/status has no VmRSS line (not Linux?)")


def growth_after_warmup(samples: list[tuple[int, float]], warmup_fraction: float = 0.2) -> float:
    """Largest RSS after warm-up relative to the first post-warm-up sample.

    Args:
      samples: `(step, rss_mb)` in step order.
      warmup_fraction: leading fraction of the samples ignored (compilation, buffers filling).

    Returns:
      `max(after warm-up) / first after warm-up - 1` (0.05 = 5% growth); 0 for fewer than two
      samples.
    """
    if len(samples) < 2:
        return 0.0
    start = min(len(samples) - 1, max(1, int(len(samples) * warmup_fraction)))
    after = [rss for _, rss in samples[start:]]
    return max(after) / after[0] - 1.0


def run(steps: int, every: int, data_root: str | None) -> list[tuple[int, float]]:
    """Trains the tiny config (fine-tuning only) for `steps` steps; RSS samples every `every`."""
    from configs import tiny
    from m2u_jax import trainer

    config = tiny.get_config()
    config.train.pretrain_steps = 0
    config.train.finetune_steps = steps
    config.train.log_every = every
    config.train.checkpoint_every = steps  # one save at the end: the loop is what is measured
    config.train.keep_checkpoints = 1
    config.eval.after_training = False
    samples = [(0, resident_memory_mb())]
    original_write = trainer.MetricLog.write

    def write_and_sample(self, global_step, scalars):  # called every `every` steps
        original_write(self, global_step, scalars)
        samples.append((global_step, resident_memory_mb()))
        print(f"step {global_step}: RSS {samples[-1][1]:.1f} MiB", flush=True)

    trainer.MetricLog.write = write_and_sample
    with tempfile.TemporaryDirectory() as scratch:
        if data_root is None:
            from m2u_jax.data import synthetic

            data_root = os.path.join(scratch, "data")
            synthetic.generate(
                data_root,
                categories="fabric",
                image_size=32,
                num_train=16,
                num_test_good=2,
                num_test_defect=1,
            )
        config.data.root = data_root
        try:
            trainer.train(config, os.path.join(scratch, "run"))
        finally:
            trainer.MetricLog.write = original_write
    return samples


def markdown_table(samples: list[tuple[int, float]]) -> str:
    lines = ["| step | RSS (MiB) | vs. first post-warm-up sample |", "|---:|---:|---:|"]
    start = min(len(samples) - 1, max(1, int(len(samples) * 0.2)))
    base = samples[start][1]
    for index, (step, rss) in enumerate(samples):
        relative = f"{100 * (rss / base - 1):+.1f}%" if index >= start else "(warm-up)"
        lines.append(f"| {step} | {rss:.1f} | {relative} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="training steps (default 2000)")
    parser.add_argument("--every", type=int, default=100, help="sample RSS every N steps")
    parser.add_argument("--data_root", default=None, help="MVTec-layout data (default: synthetic)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)
    if args.steps < args.every or args.every <= 0:
        parser.error(f"--steps={args.steps} must be >= --every={args.every} > 0")
    start = time.perf_counter()
    samples = run(args.steps, args.every, args.data_root)
    growth = growth_after_warmup(samples)
    if args.markdown:
        print(markdown_table(samples))
    verdict = "PASS" if growth <= 0.10 else "FAIL"
    print(
        f"{args.steps} steps in {time.perf_counter() - start:.0f}s; RSS growth after warm-up "
        f"{100 * growth:+.1f}% (limit +10%): {verdict}"
    )
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
