"""Real data on one GPU at DRAEM length: `configs/cpu_real.py`'s recipe (DRAEM-class synthetic
anomalies, a pixel head that compares the input with its reconstruction, the fpr threshold rule,
classes from the data) with a ViT-S at 256 px and a budget near DRAEM's (about 21k steps of
batch 8 per category, i.e. ≈170k image passes; here 6,000 steps of batch 32 ≈ 190k).

    python tools/quality_study.py --config configs/gpu_real.py --workdir runs/quality_gpu \
        --data_dir ../shared/data --runs mt_unsup,mt_sup@0.1,neu_sup

For a lent device: `tools/gpu_check.sh` is the place for the timed check; this config is the
recipe it trains. Several GPUs: raise `train.batch_size` with the device count.
"""

import pathlib

from m2u_jax.config import config_from_file

# By path, so the file loads from any working directory (the tools run it as a file).
_BASE = pathlib.Path(__file__).with_name("cpu_real.py")


def get_config():
    config = config_from_file(str(_BASE))
    config.data.image_size = 256
    config.model.variant = "S"
    config.model.patch_size = 16
    config.model.patch_stride = 16
    config.model.fusion_every = 2
    config.model.det_strides = (8, 16, 32)
    config.model.det_channels = 128
    config.model.decoder_channels = 64
    config.model.detail_channels = 32
    config.model.projection_dim = 128
    config.model.dtype = "bfloat16"
    config.model.attention = "cudnn"
    config.model.scan_blocks = True
    config.train.batch_size = 32
    config.train.pretrain_steps = 1000
    config.train.finetune_steps = 6000
    config.train.learning_rate = 5e-4
    config.train.warmup_steps = 300
    config.train.checkpoint_every = 1500
    config.eval.batch_size = 64
    config.eval.num_mc_samples = 8
    config.eval.mc_chunk_size = 0
    config.eval.feature_memory_size = 65536
    return config
