"""MVTec AD (or any real set) on a TPU slice: ViT-B at 256 px, bf16, parameters sharded (FSDP).

A v4-32 / v5e-32 slice (every host runs the same command, see README.md):
    gcloud compute tpus tpu-vm ssh NAME --worker=all --command \\
      "cd m2u-jax && .venv/bin/python train.py --config configs/mvtec_tpu.py \\
       --workdir gs://BUCKET/mvtec_B --config.data.root=/data/mvtec_ad --multihost"
The training schedule is configs/mvtec_gpu.py's; this file changes the model and the mesh. The
mesh is ('data', 'fsdp') with `train.mesh_fsdp` devices sharing each parameter; the global
batch must be divisible by the device count.
"""

import pathlib

from m2u_jax.config import config_from_file

# By path, so the file loads from any working directory (the tools run it as a file).
_BASE = pathlib.Path(__file__).with_name("mvtec_gpu.py")


def get_config():
    config = config_from_file(str(_BASE))
    config.model.variant = "B"
    config.model.attention = "dot_product"  # XLA's fused attention (cuDNN is GPU-only)
    config.model.remat = True  # recompute block activations: room for the larger batch
    config.train.batch_size = 512
    config.train.mesh_fsdp = 4
    config.eval.batch_size = 256
    return config
