"""The tiny training run that the in-process tests train: one config, so that their programs
are the same and compile once per test run (the persistent cache in tests/conftest.py)."""

from configs import tiny


def tiny_run_config(root, *, pretrain_steps=0, finetune_steps=2, seed=0):
    """configs/tiny.py on the generated data at `root` on one device, a few steps, a checkpoint
    every 2 steps and no box-score floor: the untrained detector still yields boxes to score."""
    config = tiny.get_config()
    config.seed = seed
    config.data.root = str(root)
    config.train.pretrain_steps = pretrain_steps
    config.train.finetune_steps = finetune_steps
    config.train.checkpoint_every = 2
    config.model.det_score_threshold = 0.0
    # One device: these runs test what a run writes and reads, not the sharding (8 devices in
    # tests/test_trainer.py, test_sharding.py, test_multihost.py); one device compiles faster.
    config.train.mesh_devices = 1
    # No matplotlib figures: they cost more than the tiny model's predictions, and only
    # tests/test_evaluate.py checks them (it turns them on).
    config.eval.figures = False
    return config
