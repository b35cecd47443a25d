"""CPU demo config (`make demo`): the synthetic MVTec-format set on a 2-core CPU.

Tuned in the demo issue; until then it is a small variant at 64x64.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.root = "data/synthetic"
    config.data.image_size = 64
    config.model.variant = "tiny"
    config.model.patch_size = 8
    config.model.patch_stride = 8
    config.model.det_strides = (8, 16)
    config.model.decoder_channels = 16
    config.train.pretrain_steps = 100
    config.train.finetune_steps = 400
    config.train.batch_size = 16
    config.train.checkpoint_every = 100
    config.eval.batch_size = 16
    return config
