"""CPU config for real data on a laptop: train + evaluate a set the size of Magnetic-tile or
NEU-DET in about 30 minutes on 2 CPU cores: 1,800 fine-tuning steps took 27.6 training + 1.6
evaluation minutes on NEU-DET and 27.5 + 2.1 on Magnetic-tile (unsupervised) on the 2-core
development machine (2026-12-06); at the slowest pace logged that week (0.89 steps/s) they would
take about 36 training minutes (docs/quality.md, "Fewer steps to fit the 30 minutes").

    # unsupervised (train on defect-free images only)
    python train.py --config configs/cpu_real.py --workdir runs/mt \
        --config.data.format=mask_folder --config.data.root=PATH --config.data.good_class=MT_Free
    # supervised boxes (Pascal VOC)
    python train.py --config configs/cpu_real.py --workdir runs/neu \
        --config.data.format=voc --config.data.root=PATH --config.data.protocol=supervised

Why these settings: docs/quality.md (each choice measured on real data, with its command).
"""

from m2u_jax import default_config as default


def get_config():
    config = default.get_config()
    config.data.image_size = 128
    config.data.max_boxes = 16
    config.data.synthetic_anomaly_prob = 0.5
    # Flips keep the directions of a surface's marks: NEU-DET mAP@0.5 0.605 against 0.472
    # without them (and without the 4-view inference below) (docs/quality.md).
    config.data.random_flips = True
    # Left off, measured on NEU-DET at this budget: YOLO's mosaic (data.mosaic_prob=1: mAP@0.5
    # 0.605 -> 0.553), zoom augmentation (data.random_scale; level), transposed examples
    # (data.random_transpose: 0.558, crazing halves: its texture has an orientation); no dropout
    # (model.dropout_rate=0: 0.592, and MC dropout needs it); 160 px for the same minutes
    # (data.image_size=160, 1,150 steps: 0.561) (docs/quality.md).
    # Gray anomalies on gray images (Magnetic-tile, NEU-DET are grayscale files): colour is no
    # cue a real defect there has (docs/quality.md: one run, within the run-to-run spread).
    config.data.synthetic_match_gray = True
    # With labelled defects (supervised protocol), a quarter of the good images get one of them
    # pasted in through its mask: Magnetic-tile with 10 % of the masks (23) 0.803 / 0.611 / 0.501
    # -> 0.823 / 0.730 / 0.632 image / pixel AUROC / AUPRO at seed 0, 0.660 / 0.655 / 0.469 ->
    # 0.774 / 0.661 / 0.630 at seed 1; all masks (seed 0) AUPRO 0.671 -> 0.719, mAP@0.5 0.102 ->
    # 0.258. Left off: half the good images (0.5; two-seed pixel AUROC 0.695 -> 0.683, AUPRO
    # 0.631 -> 0.667) and mirrored donors (data.real_paste_flips; 0.730 -> 0.681 pixel AUROC)
    # (docs/quality.md, "Real defects pasted into good images"). No effect without labelled
    # defects or good images (unsupervised, NEU-DET).
    config.data.real_paste_prob = 0.25
    config.model.variant = "tiny"
    # 16-px patches (the detail stem keeps the fine detail): a fine-tuning step costs 33 against
    # 44 GFLOP, so 2,200 steps fit the minutes 1,600 took with 8-px patches. NEU-DET mAP@0.5
    # +0.016 / +0.015 at two seeds; Magnetic-tile pixel AUROC +0.030 / +0.067, image AUROC
    # -0.013 / -0.015 (unsupervised / 10 % of the masks; docs/quality.md, "Coarser tokens").
    config.model.patch_size = 16
    config.model.patch_stride = 16
    config.model.fusion_every = 1
    # Two levels: a third (stride 32) fitted the large boxes better with a one-layer head, but
    # with today's three-layer branches NEU-DET mAP@0.5 falls 0.605 -> 0.573 (docs/quality.md).
    config.model.det_strides = (8, 16)
    # A 64-channel detection head: NEU-DET mAP@0.5 0.444 -> 0.467, mAP@[.5:.95] 0.144 -> 0.165
    # at the same steps, for ~10 % more FLOPs per step (docs/quality.md).
    config.model.det_channels = 64
    # Class logits from a 3x3 branch of their own (YOLOX's decoupled head): NEU-DET mAP@0.5
    # 0.503 -> 0.521 (seed 0) and 0.499 -> 0.514 (seed 1), ~5 % more FLOPs; Magnetic-tile
    # (5 classes when supervised): supervised runs lower at seed 0, level at seed 1
    # (docs/quality.md).
    config.model.det_decoupled = True
    # Three 3x3 conv + SiLU layers in each branch (YOLOX has two): NEU-DET mAP@0.5 0.537 -> 0.583
    # -> 0.609 and mAP@[.5:.95] 0.196 -> 0.245 -> 0.262 for one, two, three layers at the same
    # steps, each layer 11 % more FLOPs per step (docs/quality.md).
    config.model.det_branch_convs = 3
    config.model.decoder_channels = 32
    config.model.detail_channels = 16
    config.model.pixel_head_recon = True
    config.model.mc_dropout_blocks = 0
    # A box per class at each point (model.det_multi_label=True, YOLO's validation rule) left
    # NEU-DET level, 0.6053 against 0.6048 mAP@0.5 on one checkpoint: off (docs/quality.md).
    config.model.det_score_threshold = 0.05
    config.model.projection_dim = 64
    # Image score = maximum of the 5x5-smoothed anomaly map, no classifier term (DRAEM's rule;
    # measured against top-k and the classifier mix in docs/quality.md).
    config.model.image_score_topk = 0.0
    config.model.image_score_smoothing = 5
    config.model.image_score_classifier = 0.0
    config.model.num_defect_classes = 0  # from the data
    # Inference averages the maps of the image and its three flips (the training flips them
    # too): Magnetic-tile pixel AUROC +0.008 to +0.039 and NEU-DET's +0.005 on the same
    # checkpoints, for 4x the inference FLOPs (docs/quality.md).
    config.model.test_time_flips = 4
    # Objectness learns the IoU of each predicted box (quality focal loss): NEU-DET mAP@0.5
    # 0.38 -> 0.42 at the same steps (docs/quality.md).
    config.train.det_obj_target = "iou"
    config.train.det_fallback = "inside"
    # Each point's farthest box edge picks its level ('edge'): by the box's own size ('box')
    # NEU-DET's positives move to the finer level and mAP@0.5 falls to 0.555; keeping a thin box
    # on the levels that hold its points (train.det_min_level_points=1): 0.590 (docs/quality.md).
    config.train.det_level_size = "edge"
    # YOLOX's centre square (2.5 strides); 3.5 gave the large boxes more positives and NEU-DET
    # mAP@0.5 0.593 (docs/quality.md).
    config.train.det_center_radius = 2.5
    config.train.pretrain_steps = 200
    # 1,800 steps fit the 30-minute aim (NEU-DET: 27.6 train + 1.6 eval minutes at 1.17 steps/s)
    # at mAP@0.5 0.605 against 0.609 for 2,200 (one seed, inside the 0.008 between two seeds);
    # Magnetic-tile unsupervised 0.774 / 0.607 / 0.473 against 0.774 / 0.566 / 0.480 (image /
    # pixel AUROC / AUPRO), all masks level; 10 % of the masks 0.611 / 0.501 against 0.663 / 0.552
    # at seed 0, but 0.655 / 0.469 at seed 1: the seed spread, not the steps (docs/quality.md).
    config.train.finetune_steps = 1800
    config.train.batch_size = 32
    config.train.learning_rate = 2e-3
    config.train.warmup_steps = 100
    config.train.checkpoint_every = 500
    config.train.log_every = 100
    config.eval.batch_size = 32
    config.eval.num_mc_samples = 4
    config.eval.feature_memory_size = 16384
    return config
