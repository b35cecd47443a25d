"""Tiny config for tests: a 2-block backbone on 32x32 images; one step takes well under a second.

python train.py --config configs/tiny.py --workdir /tmp/m2u_tiny   # about a minute on 2 CPU cores
"""

from m2u_jax import default_config as default


def get_config():
    config = default.get_config()
    config.data.image_size = 32
    config.data.max_boxes = 4
    config.model.variant = "tiny"
    config.model.patch_size = 8
    config.model.patch_stride = 8
    config.model.fusion_every = 1
    config.model.mc_dropout_blocks = 1
    config.model.decoder_channels = 8
    config.model.det_channels = 16
    config.model.det_strides = (8, 16)
    config.model.det_max_detections = 8
    config.model.projection_dim = 16
    config.train.pretrain_steps = 4
    config.train.finetune_steps = 8
    config.train.batch_size = 8
    config.train.warmup_steps = 2
    config.train.checkpoint_every = 4
    config.train.log_every = 2
    config.eval.batch_size = 8
    config.eval.num_mc_samples = 4
    config.eval.num_overlays = 2
    config.eval.after_training = False
    return config
