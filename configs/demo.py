"""CPU demo config (`make demo`): the embedded synthetic MVTec-format set on a 2-core CPU.

make demo    # data -> contrastive pretraining -> multi-task fine-tuning -> eval -> ONNX export

The data (`make demo` writes it into data/synthetic): 3 categories (fabric, metal, pill) at
64 px, 60 good training images and 30 good test images per category, 30 images per defect kind
(crack, hole, scratch, stain) per category. The supervised protocol splits the labelled defects
per type into train/validation/test (seeded), so the detector learns the real defect classes and
the test split stays held back.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data.root = "data/synthetic"
    config.data.image_size = 64
    config.data.protocol = "supervised"
    config.data.max_boxes = 4
    config.model.variant = "tiny"
    config.model.patch_size = 8
    config.model.patch_stride = 8
    config.model.fusion_every = 1
    config.model.det_strides = (8, 16)
    config.model.det_channels = 32
    config.model.decoder_channels = 32
    config.model.mc_dropout_blocks = 1
    config.model.det_score_threshold = 0.05
    config.model.projection_dim = 64
    config.train.pretrain_steps = 100
    config.train.finetune_steps = 600
    config.train.batch_size = 32
    config.train.learning_rate = 2e-3
    config.train.warmup_steps = 50
    config.train.checkpoint_every = 200
    config.train.log_every = 50
    config.eval.batch_size = 32
    config.eval.num_mc_samples = 8
    return config
