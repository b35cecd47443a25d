"""Default configuration: every key m2u-jax reads, each with a one-line comment.

Every other config imports this one and overrides values; `m2u_jax.config.validate` rejects a
config whose key set differs from this one, so a typo in a variant fails loudly.

Lists that users set on the command line (categories, modalities) are comma-separated strings,
e.g. `--config.data.categories=bottle,cable`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # Seed for parameter init, data order, augmentation and dropout.

    # ---------------------------------------------------------------- data
    config.data = data = ml_collections.ConfigDict()
    data.format = "mvtec_ad"  # 'mvtec_ad' | 'mvtec_3d' | 'mask_folder' | 'voc' | 'tfds'.
    data.root = "data/synthetic"  # Dataset root folder (manual_dir for 'tfds').
    data.tfds_data_dir = ""  # Prepared-data folder of the 'tfds' builder; '' = TFDS default.
    data.categories = ""  # Comma-separated categories to use; '' = every category under root.
    data.image_size = 256  # Square side the images are resized to (pixels).
    data.modalities = "rgb"  # Comma-separated stacked modalities: rgb|gray,thermal,xray,depth.
    data.protocol = "unsupervised"  # 'unsupervised' (train on good) | 'supervised' (labels).
    data.labeled_fraction = 1.0  # Fraction of the labelled training defects kept (supervised only).
    data.defect_share = 0.0  # Fine-tuning: oversample real defects to this share; 0 = natural.
    data.val_fraction = 0.2  # Fraction of each split carved out as validation when none exists.
    data.test_fraction = 0.2  # Fraction of each class held out as test when no test split exists.
    data.max_boxes = 16  # Boxes per image, padded (static shapes).
    data.good_class = "good"  # Folder/class name that marks defect-free images (mask_folder, voc).
    data.skip_bad_files = False  # Skip unreadable/inconsistent files with a counted warning.
    data.synthetic_anomaly_prob = 0.5  # Probability that a training image gets a synthetic anomaly.
    data.synthetic_max_beta = 0.8  # Image weight in a synthetic anomaly ~ U(0, this); 1 = faint.
    data.synthetic_shading = 0.0  # Fraction of anomalies that are soft-edged gain changes.
    data.synthetic_band = 0.0  # Fraction of noise-shaped textures whose mask is a band (a side).
    data.synthetic_seamless = 0.0  # Fraction of noise-shaped textures on the image's low-pass.
    data.synthetic_coarsest_cells = 2  # Fewest mask-noise cells per axis: 1 (DRAEM) or 2.
    data.synthetic_match_gray = False  # Gray anomalies on gray images (channels within 2/255).
    data.random_flips = False  # Fine-tuning: mirror each image (mask, boxes) left-right/up-down.
    # With random_flips: all 8 rotations and mirrors. Only for textures with no direction (NEU-DET
    # lost 0.047 mAP@0.5 with it: its marks run one way; docs/quality.md).
    data.random_transpose = False  # Fine-tuning: swap rows and columns (image, mask, boxes), p=1/2.
    data.random_scale = 0.0  # Fine-tuning: zoom image, mask, boxes by U(1 - this, 1 + this).
    data.train_crop = 0  # Train on random crops of this side (px) of the resized image; 0 = off.
    # Fine-tuning (supervised): an example becomes, with this probability, a window of a 2x2
    # canvas of itself and three random training images (YOLO's mosaic; objects keep their scale).
    data.mosaic_prob = 0.0  # Probability of a mosaic example; 0 = off.
    data.mosaic_off_fraction = 0.1  # Last fraction of fine-tuning steps without mosaics (YOLOv8).
    # Fine-tuning (supervised): a good image gets, with this probability, a labelled real defect
    # of the training split pasted in through its mask (copy-paste), so a few masks show up on
    # many backgrounds. Examples that get one are not also given a synthetic anomaly. Nothing is
    # pasted when the training split holds no labelled defect (the unsupervised protocol).
    data.real_paste_prob = 0.0  # Probability that a good image gets a real defect pasted in.
    data.real_paste_flips = False  # Mirror each pasted defect at random (its own draw) first.
    data.num_parallel_calls = -1  # tf.data parallelism for map(); -1 = AUTOTUNE.
    data.cache = True  # Cache decoded, resized images in memory before augmentation.
    data.prefetch = 2  # Batches prefetched to the devices.

    # ---------------------------------------------------------------- model
    config.model = model = ml_collections.ConfigDict()
    # The model reads modalities and image size from the data section (linked, not copied).
    model.modalities = data.get_ref("modalities")  # Same as data.modalities (a reference).
    model.image_size = data.get_ref("image_size")  # Same as data.image_size (a reference).
    model.variant = "S"  # Backbone size: 'tiny' | 'tiny4' | 'S' | 'B' (width, depth, heads, MLP).
    model.scales = (1.0, 0.5)  # Image scales tokenized by the shared patch embedding (MSPG).
    model.patch_size = 16  # Patch side (pixels).
    model.patch_stride = 16  # Patch stride (pixels); < patch_size gives overlapping patches.
    model.fusion_every = 2  # Cross-scale attention fusion after every N backbone blocks.
    model.posemb = "learn"  # 2-D position embedding: 'learn' | 'sincos2d'.
    model.dropout_rate = 0.1  # Dropout in MLP/attention outputs; also the MC-dropout rate.
    model.mc_dropout_blocks = 2  # Last N backbone blocks sampled by MC dropout (trunk runs once).
    model.attention = "dot_product"  # 'dot_product' (jax.nn) | 'cudnn' (flash, GPU) | 'einsum'.
    model.scan_blocks = False  # nn.scan over backbone blocks (faster compile for deep models).
    model.remat = False  # Rematerialise block activations in the backward pass.
    model.dtype = "float32"  # Compute dtype: 'float32' | 'bfloat16'.
    model.param_dtype = "float32"  # Parameter dtype.
    model.decoder_channels = 64  # Channels of the upsampling decoder of the anomaly branch.
    model.detail_channels = 0  # Full-res conv stem for pixel logits and boxes (skips); 0 = off.
    model.detail_growth = 1  # Stem width x this per stride (2 measured on NEU-DET: no gain).
    model.pixel_head_recon = False  # Pixel head also sees [input, recon] (DRAEM); needs detail.
    # Detection and image heads train on stop-gradient trunk features, so the trunk learns from
    # the reconstruction and the anomaly map alone; 'auto' = under the unsupervised protocol,
    # where those heads' targets are synthetic anomalies (docs/quality.md).
    model.detach_aux_heads = "auto"  # 'always' | 'never' | 'auto'.
    model.det_channels = 128  # Channels of the YOLO-style detection CNN (neck and shared head).
    # True: the shared head's class logits get a 3x3 branch of their own (YOLOX's decoupled head).
    model.det_decoupled = False  # Separate class and box/objectness branches in the head.
    model.det_branch_convs = 1  # 3x3 conv + SiLU layers in each branch of the shared head.
    model.det_norm_groups = 0  # GroupNorm groups after each 3x3 conv of the head; 0 = none.
    # R >= 2: each box side is a distribution over 0..R-1 strides (GFL / YOLOv8), trained by the
    # distribution focal loss (train.loss_weights.det_dfl); 0 = one softplus distance per side.
    model.det_box_bins = 0  # Bins per box side (0 or >= 2; 16 measured on NEU-DET: level).
    model.num_defect_classes = 4  # Defect classes of the detection / type heads; 0 = from data.
    model.det_strides = (16, 32)  # Feature strides (pixels) of the YOLO-style head levels.
    model.det_max_detections = 32  # Boxes kept after NMS (static output size).
    model.det_score_threshold = 0.25  # Minimum box score kept by post-processing.
    model.det_iou_threshold = 0.5  # IoU above which NMS suppresses a same-class box.
    model.det_nms_merge = False  # Weighted NMS: a kept box = score x IoU mean of its cluster.
    model.det_multi_label = False  # A box per class at each point (True), or for its best class.
    model.image_score_topk = 0.01  # Fraction of pixels averaged (top-k) for the map-based score.
    model.image_score_smoothing = 1  # Mean-filter width (px) on the map before top-k; 1 = off.
    model.image_score_classifier = 0.5  # Weight of the image head in the score (rest: the map).
    # Evaluation (MC-dropout and ensemble statistics too), Predictor and export average the
    # anomaly, image and type probabilities over the image and its flips; boxes: unflipped.
    model.test_time_flips = 1  # 1 = off | 2 = + left-right | 4 = + up-down, both (4x inference).
    model.projection_dim = 128  # Output size of the contrastive projection/predictor MLPs.

    # ---------------------------------------------------------------- train
    config.train = train = ml_collections.ConfigDict()
    train.pretrain_method = "simclr"  # Contrastive stage: 'simclr' | 'mocov3'.
    train.pretrain_steps = 1000  # Contrastive pretraining steps (0 skips the stage).
    train.finetune_steps = 5000  # Multi-task fine-tuning steps.
    train.batch_size = 64  # Global batch size over all hosts and devices.
    train.learning_rate = 1e-3  # Peak AdamW learning rate.
    train.warmup_steps = 200  # Linear warmup steps of each stage.
    train.weight_decay = 0.05  # AdamW decay (not on norms, biases, position embeddings).
    train.grad_clip_norm = 1.0  # Global-norm gradient clipping; 0 disables.
    # With model.detach_aux_heads in effect: the detection and image heads' gradients are
    # clipped by a norm of their own, so they cannot scale down the trunk's update either.
    train.clip_heads_apart = False  # Detached heads get their own grad_clip_norm clip.
    train.grad_accum_steps = 1  # Micro-batches accumulated per optimizer update.
    train.temperature = 0.2  # Temperature of NT-Xent / MoCo v3 InfoNCE.
    train.moco_momentum = 0.99  # Base momentum of the MoCo v3 key encoder (cosine to 1.0).
    train.init_npz = ""  # Optional big_vision/AugReg ViT .npz to initialise the backbone.
    train.loss_weights = ml_collections.ConfigDict(
        dict(
            recon=1.0,  # L2 + SSIM reconstruction of the clean image.
            seg_focal=1.0,  # Pixel focal loss on anomaly masks.
            seg_dice=1.0,  # Pixel dice loss on anomaly masks.
            cls=1.0,  # Image good/defective focal loss.
            det_obj=1.0,  # Detection objectness focal loss.
            det_cls=1.0,  # Detection class focal loss.
            det_box=2.0,  # Detection IoU (GIoU) loss.
            # GFL's ratio to the GIoU weight (0.25 : 2); 0 loss without model.det_box_bins.
            det_dfl=0.25,  # Distribution focal loss of the box-side bins.
        )
    )
    # Focal alpha of the pixel loss: defect pixels weigh alpha, normal ones 1 - alpha (RetinaNet's
    # 0.25 favours normal pixels; DRAEM weighs both alike, i.e. 0.5 at twice the loss weight).
    train.seg_focal_alpha = 0.25  # Weight of defect pixels in the pixel focal loss, in [0, 1].
    # 'iou': a positive point's objectness learns the IoU of its predicted box with the target
    # (quality focal loss), so box scores rank boxes by fit.
    train.det_obj_target = "binary"  # Objectness target on positives: 'binary' (1) | 'iou'.
    # A box that no level's size range gives a point (a long thin scratch: too long for the fine
    # levels, too narrow for a coarse level's points) takes 'nearest': the finest-level point
    # nearest its centre, or 'inside': every point inside it near its centre, on any level.
    train.det_fallback = "nearest"  # Positives of a box without candidates: 'nearest' | 'inside'.
    # Which size picks a box's level (boxes.assign_targets): 'edge', a point's farthest box edge
    # (FCOS), or 'box', half the box's geometric-mean side (FPN's rule by area: thin boxes stay
    # on the fine levels).
    train.det_level_size = "edge"  # Size that picks the level of a box: 'edge' | 'box'.
    # With n > 0 a box uses only the levels holding n of its points near its centre, the
    # coarsest of them taking its largest sizes too (boxes.assign_targets): a scratch that a
    # coarse level's sparse grid misses keeps its points on the finer levels.
    train.det_min_level_points = 0  # Points a level needs inside a box to learn it; 0: any level.
    # Centre sampling (boxes.assign_targets): a point learns a box only within this many of its
    # level's strides of the box centre (YOLOX 2.5, FCOS 1.5).
    train.det_center_radius = 2.5  # Half-side of the centre square, in strides.
    # Which points learn each box: 'center' (fixed rules: level size ranges and centre sampling,
    # boxes.assign_targets; det_fallback applies) or 'aligned' (each box takes the 10 points
    # inside it whose current prediction scores and fits it best, boxes.align_targets).
    train.det_assigner = "center"  # Detection target assignment: 'center' | 'aligned'.
    # The positives' box loss, 1 - an IoU measure: 'giou' (FCOS), 'diou' (IoU minus the centre
    # distance over the enclosing box's diagonal, squared) or 'ciou' (DIoU minus an aspect-ratio
    # term: YOLOv5/v8's choice).
    train.det_box_loss = "giou"  # Box regression loss: 'giou' | 'diou' | 'ciou'.
    # An exponential moving average of the fine-tuning params, kept beside them in each
    # checkpoint; it does not change training. Evaluation, validation, export and prediction use
    # it (eval.use_ema). Its momentum warms up as min(decay, (1 + t) / (10 + t)).
    train.ema_decay = 0.0  # Decay of the fine-tuning params' EMA, in [0, 1); 0 = off.
    train.mesh_fsdp = 1  # Size of the 'fsdp' mesh axis that shards parameters (1 = pure data).
    train.mesh_devices = 0  # Mesh devices: 0 = all of every process; N = first N of one process.
    train.checkpoint_every = 500  # Steps between orbax checkpoints (and one at the end).
    train.keep_checkpoints = 3  # Checkpoints kept.
    train.log_every = 50  # Steps between metric logs (the only host syncs).
    train.profile_steps = (0, 0)  # Capture a jax.profiler trace of steps [a, b); (0, 0) = off.
    train.peak_flops = 0.0  # Device peak FLOP/s for MFU; 0 = look up the device table.
    train.validate_every = 0  # Fine-tuning steps between validation passes (0 = off).
    train.best_metric = ""  # Keep the best-validating params in DIR/best by this metric; "" = off.

    # ---------------------------------------------------------------- eval
    config.eval = evaluation = ml_collections.ConfigDict()
    evaluation.batch_size = 32  # Evaluation batch size.
    evaluation.num_mc_samples = 16  # MC-dropout samples for uncertainty (1 = deterministic).
    evaluation.mc_chunk_size = 1  # MC samples run at a time (CPU: caches); 0 = all T (GPU/TPU).
    evaluation.review_budget = 0.05  # Fraction of images the review policy may send to a person.
    evaluation.threshold_rule = "auto"  # 'f1' | 'fpr' | 'auto' (f1 if validation has 5+ defects).
    evaluation.target_fpr = 0.05  # 'fpr' rule: max fraction of good validation images rejected.
    # Evaluation, export and the predictors then take the uncertainty (score mean and variance
    # over the E members) from a deep ensemble instead of MC dropout.
    evaluation.ensemble_workdirs = ""  # Comma-separated runs of the same architecture; "" = off.
    evaluation.feature_memory_size = 0  # >0: also score with a kNN memory of this many patches.
    evaluation.num_overlays = 8  # Overlays written per group (worst cases, review queue).
    evaluation.after_training = True  # train.py evaluates its final checkpoint into DIR/eval.
    evaluation.figures = True  # eval/plots and eval/overlays PNGs; off: tables and arrays only.
    # The comparisons behind the image-score and map-smoothing defaults (docs/quality.md):
    # image AUROC of every score reduction and pixel metrics of mean-filtered maps.
    evaluation.variant_metrics = False  # Also write them into metrics.json (quality study: on).
    evaluation.use_ema = True  # Use the params' EMA when the run kept one (train.ema_decay > 0).
    return config
