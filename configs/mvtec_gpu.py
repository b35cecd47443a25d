"""MVTec AD (or any real set) on NVIDIA GPUs: ViT-S at 256 px, bf16 compute, cuDNN attention.

One node with 8 GPUs (global batch 256 = 32 per GPU):
    python train.py --config configs/mvtec_gpu.py --workdir runs/mvtec_S \\
        --config.data.root=~/data/mvtec_ad --config.data.categories=bottle,cable
A SLURM cluster runs the same command on every node with `--multihost` (see README.md); the
batch is global, so keep it divisible by the total GPU count. On one GPU lower the batch
(`--config.train.batch_size=64`). Variant B: `--config.model.variant=B` (scan over blocks is on,
so its compile stays short).
"""

from m2u_jax import default_config as default


def get_config():
    config = default.get_config()
    config.data.image_size = 256
    config.model.variant = "S"
    config.model.dtype = "bfloat16"  # bf16 matmuls, float32 parameters and optimizer state
    config.model.param_dtype = "float32"
    config.model.attention = "cudnn"  # cuDNN flash attention (head_dim 64 in S and B)
    config.model.scan_blocks = True
    config.train.batch_size = 256
    config.train.pretrain_steps = 2000
    config.train.finetune_steps = 10000
    config.train.learning_rate = 1e-3
    config.train.warmup_steps = 500
    config.train.checkpoint_every = 1000
    config.train.log_every = 100
    config.eval.batch_size = 128
    config.eval.mc_chunk_size = 0  # all T samples in one vmap: a GPU wants the parallel work
    return config
