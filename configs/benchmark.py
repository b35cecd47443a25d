"""Benchmark settings for `m2u-benchmark` (in a checkout also `python tools/benchmark.py`); pick
one with `--config configs/benchmark.py:NAME`.

- `S256_bf16` (the default): ViT-S backbone at 256 px, bf16 compute / f32 params, global batch
  256 for training, 128 for inference, T = 16. For one GPU (H100/H200/A100):
      python tools/benchmark.py --config configs/benchmark.py:S256_bf16 \\
          --modes train,infer,mc,torch --out bench_S256_gpu.json
- `B256_bf16`: ViT-B backbone at 256 px, bf16, `nn.scan` over blocks, batch 128 / 64.
      python tools/benchmark.py --config configs/benchmark.py:B256_bf16 \\
          --modes train,infer,mc,compile --out bench_B256_gpu.json
  On a CPU, `--modes compile` measures the train step's compile time with scan_blocks False
  and True from shapes alone (nothing is allocated).
- `S128_cpu`: ViT-S at 128 px, float32, batch 8: the S variant at a size a 2-core CPU measures
  in minutes (MC dropout and train step).
      python tools/benchmark.py --config configs/benchmark.py:S128_cpu --modes train,infer,mc

Attention stays 'dot_product' (XLA's fused attention) so every setting runs everywhere; on a
GPU, `--config.model.attention=cudnn` switches to cuDNN flash attention (head_dim 64 in S and
B). The demo variant is benchmarked with configs/demo.py itself. Measured numbers, devices and
load conditions are in docs/performance.md.
"""

from m2u_jax import default_config as default

SETTINGS = ("S256_bf16", "B256_bf16", "S128_cpu")


def get_config(setting: str = "S256_bf16"):
    if setting not in SETTINGS:
        raise ValueError(
            f"configs/benchmark.py: unknown setting {setting!r}; use one of {SETTINGS}"
        )
    config = default.get_config()
    config.eval.num_mc_samples = 16
    if setting == "S128_cpu":
        config.data.image_size = 128
        config.model.variant = "S"
        config.train.batch_size = 8
        config.eval.batch_size = 8
        return config
    config.data.image_size = 256
    config.model.dtype = "bfloat16"
    # All T samples in one vmap: chunks help a CPU's caches; an accelerator wants parallel work.
    config.eval.mc_chunk_size = 0
    config.model.param_dtype = "float32"
    if setting == "S256_bf16":
        config.model.variant = "S"
        config.train.batch_size = 256
        config.eval.batch_size = 128
    else:
        config.model.variant = "B"
        config.model.scan_blocks = True
        config.train.batch_size = 128
        config.eval.batch_size = 64
    return config
