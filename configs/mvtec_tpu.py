"""MVTec AD (or any real set) on a TPU slice: ViT-B at 256 px, bf16, parameters sharded (FSDP).

A v4-32 / v5e-32 slice (every host runs the same command, see README.md):
    gcloud compute tpus tpu-vm ssh NAME --worker=all --command \\
      "cd m2u-jax && .venv/bin/python train.py --config configs/mvtec_tpu.py \\
       --workdir gs://BUCKET/mvtec_B --config.data.root=/data/mvtec_ad --multihost"
The mesh is ('data', 'fsdp') with `train.mesh_fsdp` devices sharing each parameter; the global
batch must be divisible by the device count.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.image_size = 256
    config.model.variant = "B"
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.model.attention = "dot_product"  # XLA's fused attention (cuDNN is GPU-only)
    config.model.scan_blocks = True
    config.model.remat = True  # recompute block activations: room for the larger batch
    config.train.batch_size = 512
    config.train.mesh_fsdp = 4
    config.train.pretrain_steps = 2000
    config.train.finetune_steps = 10000
    config.train.learning_rate = 1e-3
    config.train.warmup_steps = 500
    config.train.checkpoint_every = 1000
    config.train.log_every = 100
    config.eval.batch_size = 256
    config.eval.mc_chunk_size = 0
    return config
