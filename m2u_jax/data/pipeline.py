"""The input pipeline: records -> decoded, augmented, sharded batches for the trainer.

    info = load_dataset_info(config)                       # class map, split sizes (no TF)
    batches = make_train_iterator(config, mesh, stage="finetune", start_step=step)
    batch = next(batches)                                  # dict of global jax.Arrays
    for batch in iterate_eval(config, "validation"): ...   # host numpy, padded, with paths

Training (`make_train_iterator`, tf.data, TensorFlow imported lazily):

1. Order: epoch e visits the N training examples in the order of a full random permutation
   seeded by (config.seed, stage, e) (stateless ops, exact shuffle, no shuffle buffer). With
   `data.defect_share` above the real defects' natural share, fine-tuning epochs draw the
   labelled defects repeatedly (`DefectShare`). The stream is infinite and identical on every
   host; `start_step` skips
   `start_step * train.batch_size` entries of this *index* stream, which costs nothing (no
   decoding), so a resumed run continues with exactly the batches it has not seen.
2. The stream is sharded per host (`shard(jax.process_count(), jax.process_index())`), so each
   host decodes only its own examples; the global batch k holds the same examples whatever the
   number of hosts.
3. Each example is decoded by `decode.decode_record` (Pillow; a Python `DataError` names the
   file, re-raised as such by the iterator) through `tf.numpy_function` in a parallel map. With
   `data.cache` the decoded, resized example (uint16 image) is kept in host memory by index, so
   later epochs skip decoding; bad files are dropped with a warning under
   `data.skip_bad_files`. Fine-tuning examples that combine several files read their
   partners in the same map, only when drawn: YOLO's mosaic (`data.mosaic_prob`) and a
   labelled real defect pasted into a good image (`data.real_paste_prob`, `augment.paste_defect`).
4. Per example, augmentation parameters are drawn with stateless ops keyed by
   (seed, stage, epoch, index); after `batch(train.batch_size / process_count,
   drop_remainder=True)` a parallel map applies them to the whole batch (`augment`): synthetic
   anomalies for 'finetune' (contract keys of docs/interfaces.md), two contrastive views for
   'pretrain' (`views1`, `views2`). Everything is deterministic given config.seed.
5. `prefetch(data.prefetch)` on the host; the iterator turns each host-local batch into global
   arrays with `jax.make_array_from_process_local_data` and keeps `data.prefetch` batches in
   flight to the devices.

Sharding: pass a `jax.sharding.Mesh` (the batch axis is split over the mesh axes 'data' and,
if present, 'fsdp', flattened in that order) or any `jax.sharding.Sharding` for the batch.

Evaluation (`iterate_eval`) needs no TensorFlow (except for the 'tfds' format): decoding runs in
a thread pool, batches are numpy with `paths`, `categories` and `defect_names` added, no
augmentation, and the final partial batch is padded (zeros) with `valid` marking real rows.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import gc
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator, Sequence

import jax
import numpy as np

from m2u_jax import config as config_lib
from m2u_jax.modalities import MODALITY_CHANNELS, split_list
from m2u_jax.data import decode
from m2u_jax.data.records import DataError, SampleRecord
from m2u_jax.data.splits import (
    SPLITS,
    DatasetInfo,
    class_index_maps,
    load_dataset_info,
    load_splits,
)

__all__ = [
    "DatasetInfo",
    "DefectShare",
    "ExampleStore",
    "batch_sharding",
    "benchmark_pipeline",
    "iterate_eval",
    "load_dataset_info",
    "make_train_dataset",
    "make_train_iterator",
]

_STAGE_CODES = {"finetune": 1, "pretrain": 2}
_ORDER_STREAM, _AUGMENT_STREAM = 0, 1
_MAX_EPOCHS = 2**40

logger = logging.getLogger(__name__)


class ExampleStore:
    """Decodes records by index (thread-safe), optionally caching the results in memory.

    `fetch` is the body of the tf.data map; `decode` is the plain-Python form (evaluation).
    """

    def __init__(
        self,
        records: Sequence[SampleRecord],
        config,
        info: DatasetInfo,
        *,
        cache: bool,
        file_bytes_fn=None,
    ):
        self.records = list(records)
        self.image_size = int(config.data.image_size)
        self.modalities = split_list(config.data.modalities)
        self.max_boxes = int(config.data.max_boxes)
        self._skip_bad_files = bool(config.data.skip_bad_files)
        self.type_of, self._box_class_of = class_index_maps(info)  # defect name -> id / class
        self._cache = {} if cache else None
        self._file_bytes_fn = file_bytes_fn
        self._lock = threading.Lock()
        self.skipped_paths: list[str] = []
        self.first_error: DataError | None = None
        self.closed = False  # Set at exit: in-flight fetches return placeholders at once.

    @property
    def num_channels(self) -> int:
        return sum(MODALITY_CHANNELS[m] for m in self.modalities)

    def decode(self, index: int) -> decode.DecodedSample:
        """The decoded sample of record `index` (cached); raises DataError."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        record = self.records[index]
        file_bytes = self._file_bytes_fn(record) if self._file_bytes_fn is not None else None
        sample = decode.decode_record(
            record,
            image_size=self.image_size,
            modalities=self.modalities,
            max_boxes=self.max_boxes,
            box_class_of=self._box_class_of,
            file_bytes=file_bytes,
        )
        if self._cache is not None:
            self._cache[index] = sample
        return sample

    def decode_or_skip(self, index: int) -> decode.DecodedSample | None:
        """`decode`, but None (and a warning) for a bad file under data.skip_bad_files."""
        try:
            return self.decode(index)
        except DataError as error:
            if not self._skip_bad_files:
                with self._lock:
                    self.first_error = self.first_error or error
                raise
            with self._lock:
                if self.records[index].path not in self.skipped_paths:
                    self.skipped_paths.append(self.records[index].path)
                    logger.warning(
                        "skipping bad file (%d so far, data.skip_bad_files=True): %s",
                        len(self.skipped_paths),
                        error,
                    )
            return None

    def fetch(self, index) -> tuple[np.ndarray, ...]:
        """(image u16, mask u8, boxes, box_classes, box_valid, label, defect_type, ok)."""
        index = int(index)
        record = self.records[index]
        sample = None if self.closed else self.decode_or_skip(index)
        label = np.int32(record.label)
        defect_type = np.int32(self.type_of[record.defect_name])
        if sample is None:
            size, channels, boxes = self.image_size, self.num_channels, self.max_boxes
            return (
                np.zeros((size, size, channels), np.uint16),
                np.zeros((size, size), np.uint8),
                np.zeros((boxes, 4), np.float32),
                np.zeros((boxes,), np.int32),
                np.zeros((boxes,), np.float32),
                label,
                defect_type,
                np.bool_(False),
            )
        return (
            sample.image,
            sample.mask,
            sample.boxes,
            sample.box_classes,
            sample.box_valid,
            label,
            defect_type,
            np.bool_(True),
        )


class DefectShare:
    """How many real defects a fine-tuning epoch draws so that they are `share` of its examples.

    With few labelled defects (a plant's 20 masks beside 500 good parts) a uniform order shows a
    real defect in about one example of 25, next to synthetic anomalies on half the good ones, so
    the real masks barely steer training. Oversampling them (each defect drawn about equally
    often, every good image once per epoch) is the balanced sampling that mixed-supervision
    defect segmentation relies on. A share at or below the natural one changes nothing: good
    images are never dropped or repeated.

    Attributes:
      good, defect: training indices of the good and the defective examples.
      draws: defective examples per epoch (`len(defect)` when the share changes nothing).
      epoch_length: examples per epoch, `len(good) + draws`.
    """

    def __init__(self, labels: Sequence[int], share: float):
        labels = np.asarray(labels)
        self.good = np.flatnonzero(labels == 0)
        self.defect = np.flatnonzero(labels != 0)
        self.draws = len(self.defect)
        if share > 0 and len(self.good) and len(self.defect):
            wanted = int(round(share * len(self.good) / (1.0 - share)))
            self.draws = max(self.draws, wanted)
        self.epoch_length = len(self.good) + self.draws

    @property
    def active(self) -> bool:
        """Whether the epoch repeats defects (else it is a plain permutation of the examples)."""
        return self.draws > len(self.defect)

    def order(self, key):
        """The epoch's example indices (tf.int64, `[epoch_length]`) for a stateless `key`.

        Defects are drawn as whole random permutations of them, repeated and cut to `draws`, so
        two defects' counts differ by at most one; then everything is shuffled together.
        """
        import tensorflow as tf

        from m2u_jax.data import augment

        copies = -(-self.draws // len(self.defect))
        defect_keys = tf.random.stateless_uniform(
            [copies, len(self.defect)], augment.fold_key(key, 1)
        )
        drawn = tf.gather(tf.constant(self.defect, tf.int64), tf.argsort(defect_keys, axis=1))
        pool = tf.concat(
            [tf.constant(self.good, tf.int64), tf.reshape(drawn, [-1])[: self.draws]], 0
        )
        keys = tf.random.stateless_uniform([self.epoch_length], augment.fold_key(key, 2))
        return tf.gather(pool, tf.argsort(keys))


def _file_bytes_fn(config):
    if config.data.format != "tfds":
        return None
    from m2u_jax.data.tfds_mvtec_ad import reader

    return reader.ExampleBytes(config.data)


def _rgb_offset(modalities: Sequence[str]) -> int | None:
    offset = 0
    for modality in modalities:
        if modality == "rgb":
            return offset
        offset += MODALITY_CHANNELS[modality]
    return None


def make_train_dataset(
    config,
    stage: str = "finetune",
    start_step: int = 0,
    *,
    process_index: int = 0,
    process_count: int = 1,
):
    """The host-local training `tf.data.Dataset` (infinite, numpy-convertible batches).

    Args:
      config: the full config (data, train.batch_size, seed).
      stage: 'finetune' (contract batch keys) or 'pretrain' (`views1`, `views2`).
      start_step: global batches to skip (resume).
      process_index, process_count: this host and the number of hosts.

    Returns:
      `(dataset, store)`: batches of `train.batch_size // process_count` examples; the store
      holds the decode cache and the first DataError (see `make_train_iterator`).
    """
    import tensorflow as tf

    from m2u_jax.data import augment

    if stage not in config_lib.STAGES:
        raise ValueError(f"stage={stage!r} is not one of {config_lib.STAGES}")
    splits, info = load_splits(config)
    records = splits["train"]
    if not records:
        hint = ""
        if config.data.protocol == "unsupervised":
            hint = (
                " (the unsupervised protocol trains on defect-free images; check "
                "data.good_class or use data.protocol=supervised)"
            )
        raise DataError(f"{config.data.root}: the training split is empty{hint}")
    global_batch = int(config.train.batch_size)
    if global_batch % process_count:
        raise ValueError(
            f"train.batch_size={global_batch} is not divisible by the {process_count} hosts"
        )
    local_batch = global_batch // process_count
    store = ExampleStore(
        records, config, info, cache=bool(config.data.cache), file_bytes_fn=_file_bytes_fn(config)
    )
    num_examples = len(records)
    modalities = split_list(config.data.modalities)
    channels, size, max_boxes = store.num_channels, int(config.data.image_size), store.max_boxes
    parallel = (
        tf.data.AUTOTUNE if config.data.num_parallel_calls < 0 else config.data.num_parallel_calls
    )
    base_key = tf.constant([int(config.seed), _STAGE_CODES[stage]], tf.int64)
    order_key = augment.fold_key(base_key, _ORDER_STREAM)
    augment_key = augment.fold_key(base_key, _AUGMENT_STREAM)

    share = DefectShare(
        [record.label for record in records],
        float(config.data.defect_share) if stage == "finetune" else 0.0,
    )
    epoch_length = share.epoch_length
    if share.active:
        logger.info(
            "data.defect_share=%g: each fine-tuning epoch draws %d real defects (%d labelled, "
            "each %.1f times) beside %d good images",
            config.data.defect_share,
            share.draws,
            len(share.defect),
            share.draws / len(share.defect),
            len(share.good),
        )

    def epoch_order(epoch):
        key = augment.fold_key(order_key, epoch)
        if share.active:
            order = share.order(key)
        else:
            order = tf.cast(tf.argsort(tf.random.stateless_uniform([num_examples], key)), tf.int64)
        epochs = tf.fill([epoch_length], epoch)
        # Position in the epoch: a defect drawn twice gets two augmentation keys.
        slots = tf.range(epoch_length, dtype=tf.int64)
        return tf.data.Dataset.from_tensor_slices({"epoch": epochs, "index": order, "slot": slots})

    start_example = int(start_step) * global_batch
    start_epoch, offset = divmod(start_example, epoch_length)
    stream = tf.data.Dataset.range(start_epoch, _MAX_EPOCHS).flat_map(epoch_order)
    stream = stream.skip(offset).shard(process_count, process_index)

    mosaic_prob = float(config.data.mosaic_prob) if stage == "finetune" else 0.0
    crop = int(config.data.train_crop)
    # Examples before this position (in the global order) may be mosaics; the rest are plain.
    mosaic_steps = round(int(config.train.finetune_steps) * (1 - config.data.mosaic_off_fraction))
    mosaic_examples = mosaic_steps * global_batch

    def load(index):
        outputs = tf.numpy_function(
            store.fetch,
            [index],
            [tf.uint16, tf.uint8, tf.float32, tf.int32, tf.float32, tf.int32, tf.int32, tf.bool],
            stateful=False,
        )
        image, mask, boxes, box_classes, box_valid, label, defect_type, ok = outputs
        example = {
            "images": tf.ensure_shape(image, [size, size, channels]),
            "masks": tf.ensure_shape(mask, [size, size]),
            "boxes": tf.ensure_shape(boxes, [max_boxes, 4]),
            "box_classes": tf.ensure_shape(box_classes, [max_boxes]),
            "box_valid": tf.ensure_shape(box_valid, [max_boxes]),
            "labels": tf.ensure_shape(label, []),
            "defect_types": tf.ensure_shape(defect_type, []),
        }
        return example, tf.ensure_shape(ok, [])

    paste_prob = float(config.data.real_paste_prob) if stage == "finetune" else 0.0
    donors = [index for index, record in enumerate(records) if record.label > 0]
    if paste_prob > 0 and not donors:
        # The unsupervised protocol, or labels without defects: one config serves every data set.
        logger.warning(
            "data.real_paste_prob=%g: the training split holds no labelled defect to paste "
            "(protocol %s), so none is pasted",
            paste_prob,
            config.data.protocol,
        )
        paste_prob = 0.0
    if paste_prob > 0:
        logger.info(
            "data.real_paste_prob=%g: %d labelled real defects to paste into %d good images",
            paste_prob,
            len(donors),
            num_examples - len(donors),
        )
    paste_flips = bool(config.data.real_paste_flips)
    donor_table = tf.constant(donors or [0], tf.int64)
    is_good = tf.constant([record.label == 0 for record in records], tf.bool)

    def fetch(element):
        """(example, ok, key, extras): `extras` holds what `prepare` combines with the example,
        `mosaic` (its partners) and `paste` (a real defect), each read only when drawn."""
        example, ok = load(element["index"])
        key = augment.fold_key(augment_key, element["epoch"], element["index"])
        if share.active:
            key = augment.fold_key(key, element["slot"])
        extras = {}

        def blank():  # a placeholder of the example's structure (an unused branch ignores it)
            return tf.nest.map_structure(tf.zeros_like, example)

        if mosaic_prob > 0:
            draw, partners, x0, y0 = augment.sample_mosaic(key, num_examples, size, crop or size)
            position = element["epoch"] * epoch_length + element["slot"]
            use = (draw < mosaic_prob) & (position < mosaic_examples)

            def load_partners():
                loaded = [load(partners[i]) for i in range(augment.MOSAIC_PARTS - 1)]
                parts_ok = tf.reduce_all(tf.stack([part_ok for _, part_ok in loaded]))
                return tuple(part for part, _ in loaded), parts_ok

            def no_partners():
                return (blank(),) * (augment.MOSAIC_PARTS - 1), tf.constant(True)

            # Partners are read only for a drawn mosaic; a bad partner file only matters then.
            parts, parts_ok = tf.cond(use, load_partners, no_partners)
            extras["mosaic"] = {"parts": parts, "use": use, "x0": x0, "y0": y0}
            ok &= parts_ok
        if paste_prob > 0:
            draw, pick = augment.sample_paste(key, len(donors))
            use = (draw < paste_prob) & tf.gather(is_good, element["index"])
            donor, donor_ok = tf.cond(
                use,
                lambda: load(tf.gather(donor_table, pick)),
                lambda: (blank(), tf.constant(True)),
            )
            extras["paste"] = {"donor": donor, "use": use}
            ok &= donor_ok
        return example, ok, key, extras

    prob = float(config.data.synthetic_anomaly_prob)
    max_beta = float(config.data.synthetic_max_beta)
    shading = float(config.data.synthetic_shading)
    band = float(config.data.synthetic_band)
    seamless = float(config.data.synthetic_seamless)
    coarsest_cells = int(config.data.synthetic_coarsest_cells)
    match_gray = bool(config.data.synthetic_match_gray)
    flips = bool(config.data.random_flips)
    transpose = bool(config.data.random_transpose)
    scale_change = float(config.data.random_scale)
    rgb_offset = _rgb_offset(modalities)
    # Class-agnostic (unsupervised): an anomaly is a 'defect' (type 1); else its type is unknown.
    synthetic_type = 1 if info.protocol == "unsupervised" else -1

    def to_float(example):
        example = dict(example)
        example["images"] = tf.cast(example["images"], tf.float32) / 65535.0
        example["masks"] = tf.cast(example["masks"], tf.float32)
        return example

    def single(example, key):
        """The example itself, or its random crop (`data.train_crop`)."""
        if not crop:
            return example
        return augment.crop_example(example, *augment.sample_crop_origin(key, size, crop), crop)

    def prepare(example, ok, key, extras):
        example = to_float(example)
        if "paste" in extras:
            paste = extras["paste"]
            donor = to_float(paste["donor"])
            if paste_flips:
                # Mirrored on its own draw, a defect meets the backgrounds in four poses (up to
                # four times the few labelled shapes); the example's flips then move both.
                donor = augment.flip_example(donor, *augment.sample_paste_flips(key))
            example = augment.paste_defect(example, donor, paste["use"])
        mosaic = extras.get("mosaic")
        if mosaic is None:
            example = single(example, key)
        else:
            parts = [example] + [to_float(part) for part in mosaic["parts"]]
            example = tf.cond(
                mosaic["use"],
                lambda: augment.mosaic_example(parts, mosaic["x0"], mosaic["y0"], crop or size),
                lambda: single(example, key),
            )
        if stage == "pretrain":
            views = tf.stack(
                [
                    augment.sample_view_params(augment.fold_key(key, 1)),
                    augment.sample_view_params(augment.fold_key(key, 2)),
                ]
            )
            return {"images": example["images"]}, {"views": views}
        if scale_change > 0:
            example = augment.zoom_example(example, *augment.sample_zoom(key, scale_change))
        if flips or transpose:
            horizontal, vertical = augment.sample_flips(key) if flips else (False, False)
            swap = augment.sample_transpose(key) if transpose else False
            example = augment.flip_example(example, horizontal, vertical, swap)
        example["recon_valid"] = 1.0 - tf.cast(example["labels"], tf.float32)
        params = augment.sample_anomaly_params(
            key,
            example["labels"],
            prob,
            channels,
            max_beta,
            shading,
            coarsest_cells,
            band,
            seamless,
        )
        return example, params

    def augment_batch(batch, params):
        if stage == "pretrain":
            images = batch["images"]
            return {
                "views1": augment.make_views(images, params["views"][:, 0], rgb_offset),
                "views2": augment.make_views(images, params["views"][:, 1], rgb_offset),
            }
        if prob <= 0:
            return {**batch, "clean_images": batch["images"]}
        return augment.apply_anomalies(
            batch, params, synthetic_type, shading > 0, match_gray, band > 0, seamless > 0
        )

    # The functions branch on Python values only, so tf.data traces them as written: AutoGraph's
    # source rewrite would add seconds to every training start (the augmentations are long).
    plain = tf.autograph.experimental.do_not_convert
    dataset = stream.map(plain(fetch), num_parallel_calls=parallel, deterministic=True)
    dataset = dataset.filter(plain(lambda example, ok, *rest: ok))
    dataset = dataset.map(plain(prepare), num_parallel_calls=parallel, deterministic=True)
    dataset = dataset.batch(local_batch, drop_remainder=True)
    dataset = dataset.map(plain(augment_batch), num_parallel_calls=parallel, deterministic=True)
    dataset = dataset.prefetch(max(int(config.data.prefetch), 1))
    options = tf.data.Options()
    options.deterministic = True
    return dataset.with_options(options), store


def batch_sharding(mesh_or_sharding) -> jax.sharding.Sharding:
    """The sharding of a batch's leading axis: over ('data', 'fsdp') of a Mesh, or as given."""
    if isinstance(mesh_or_sharding, jax.sharding.Sharding):
        return mesh_or_sharding
    if not isinstance(mesh_or_sharding, jax.sharding.Mesh):
        raise TypeError(f"expected a jax.sharding.Mesh or Sharding, got {type(mesh_or_sharding)}")
    axes = tuple(name for name in ("data", "fsdp") if name in mesh_or_sharding.axis_names)
    if not axes:
        raise ValueError(
            f"the mesh has axes {mesh_or_sharding.axis_names}; the batch needs a 'data' axis"
        )
    spec = jax.sharding.PartitionSpec(axes if len(axes) > 1 else axes[0])
    return jax.sharding.NamedSharding(mesh_or_sharding, spec)


class _HostBatches:
    """Iterates a tf.data pipeline as numpy batches; DataErrors surface as themselves.

    The TF iterator is released at interpreter exit (`_close_open_pipelines`): TF worker threads
    still inside `tf.numpy_function` during Python's finalisation can otherwise hang the exit.
    """

    def __init__(self, dataset, store: ExampleStore):
        self._iterator = dataset.as_numpy_iterator()
        self._store = store
        _OPEN_PIPELINES.add(self)
        _register_exit_hook()

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        import tensorflow as tf

        if self._iterator is None:
            raise StopIteration
        try:
            return next(self._iterator)
        except tf.errors.OpError:
            if self._store.first_error is not None:
                raise self._store.first_error from None
            raise

    def close(self) -> None:
        self._store.closed = True
        self._iterator = None


_OPEN_PIPELINES: weakref.WeakSet = weakref.WeakSet()
_EXIT_HOOK_REGISTERED = False


def _close_open_pipelines() -> None:
    for pipeline in list(_OPEN_PIPELINES):
        pipeline.close()
    gc.collect()


def _register_exit_hook() -> None:
    # Registered after TensorFlow is imported, so it runs before TF's own exit handlers (LIFO).
    global _EXIT_HOOK_REGISTERED
    if not _EXIT_HOOK_REGISTERED:
        atexit.register(_close_open_pipelines)
        _EXIT_HOOK_REGISTERED = True


def make_train_iterator(
    config, mesh_or_sharding, stage: str = "finetune", start_step: int = 0
) -> Iterator[dict[str, jax.Array]]:
    """Infinite iterator of global training batches sharded over the batch axis.

    Args:
      config: full config; `train.batch_size` is the global batch.
      mesh_or_sharding: a Mesh (batch split over its 'data' [and 'fsdp'] axes) or a Sharding.
      stage: 'finetune' -> contract keys (`images`, `clean_images`, `recon_valid`, `masks`,
        `labels`, `defect_types`, `boxes`, `box_classes`, `box_valid`); 'pretrain' ->
        `views1`, `views2`. Shapes in docs/interfaces.md with B = train.batch_size.
      start_step: number of global batches already consumed (resume).

    Raises:
      DataError: naming the file, when a file turns out bad during decoding.
    """
    sharding = batch_sharding(mesh_or_sharding)
    if isinstance(sharding, jax.sharding.NamedSharding):
        num_shards = _batch_shards(sharding)
        if int(config.train.batch_size) % num_shards:
            raise ValueError(
                f"train.batch_size={config.train.batch_size} is not divisible by the "
                f"{num_shards} shards of the batch axis"
            )
    dataset, store = make_train_dataset(
        config,
        stage,
        start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )

    def to_global(batch):
        return {
            key: jax.make_array_from_process_local_data(sharding, value)
            for key, value in batch.items()
        }

    def generate():
        in_flight = collections.deque()
        for batch in _HostBatches(dataset, store):
            in_flight.append(to_global(batch))
            if len(in_flight) > max(int(config.data.prefetch), 0):
                yield in_flight.popleft()
        while in_flight:
            yield in_flight.popleft()

    return generate()


def _batch_shards(sharding: jax.sharding.NamedSharding) -> int:
    entry = sharding.spec[0] if len(sharding.spec) else None
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return int(np.prod([sharding.mesh.shape[name] for name in names]))


def _collate(
    samples: list, records: list[SampleRecord], store: ExampleStore, batch_size: int
) -> dict[str, np.ndarray]:
    size, channels, max_boxes = store.image_size, store.num_channels, store.max_boxes
    batch = {
        "images": np.zeros((batch_size, size, size, channels), np.float32),
        "masks": np.zeros((batch_size, size, size), np.float32),
        "labels": np.zeros((batch_size,), np.int32),
        "defect_types": np.zeros((batch_size,), np.int32),
        "boxes": np.zeros((batch_size, max_boxes, 4), np.float32),
        "box_classes": np.zeros((batch_size, max_boxes), np.int32),
        "box_valid": np.zeros((batch_size, max_boxes), np.float32),
        "recon_valid": np.zeros((batch_size,), np.float32),
        "valid": np.zeros((batch_size,), bool),
        "paths": np.full((batch_size,), "", object),
        "categories": np.full((batch_size,), "", object),
        "defect_names": np.full((batch_size,), "", object),
    }
    for row, (sample, record) in enumerate(zip(samples, records)):
        batch["paths"][row] = record.path
        batch["categories"][row] = record.category
        batch["defect_names"][row] = record.defect_name
        if sample is None:  # A skipped bad file: keeps its row, marked invalid.
            continue
        batch["images"][row] = sample.image.astype(np.float32) / np.float32(65535.0)
        batch["masks"][row] = sample.mask
        batch["labels"][row] = record.label
        batch["defect_types"][row] = store.type_of[record.defect_name]
        batch["boxes"][row] = sample.boxes
        batch["box_classes"][row] = sample.box_classes
        batch["box_valid"][row] = sample.box_valid
        batch["recon_valid"][row] = 1.0 - record.label
        batch["valid"][row] = True
    batch["clean_images"] = batch["images"]
    batch["paths"] = batch["paths"].astype(str)
    batch["categories"] = batch["categories"].astype(str)
    batch["defect_names"] = batch["defect_names"].astype(str)
    return batch


def iterate_eval(
    config, split: str, *, batch_size: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Host-side numpy batches of a split, in path order, without augmentation.

    Args:
      config: full config (`eval.batch_size` unless `batch_size` is given).
      split: 'train' | 'validation' | 'test'.

    Yields:
      The contract keys (`clean_images` = `images`, `recon_valid` = 1 - labels) plus `paths`,
      `categories`, `defect_names` `[B]` str and `valid` `[B]` bool (False for padding rows of
      the last batch and for bad files skipped under data.skip_bad_files).
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    splits, info = load_splits(config)
    records = splits[split]
    store = ExampleStore(records, config, info, cache=False, file_bytes_fn=_file_bytes_fn(config))
    batch_size = int(batch_size or config.eval.batch_size)
    workers = max(1, min(8, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending = collections.deque()
        starts = iter(range(0, len(records), batch_size))

        def submit():
            start = next(starts, None)
            if start is not None:
                indices = range(start, min(start + batch_size, len(records)))
                pending.append((start, [pool.submit(store.decode_or_skip, i) for i in indices]))

        for _ in range(2):  # Decode the next batch while the caller uses this one.
            submit()
        while pending:
            start, futures = pending.popleft()
            samples = [future.result() for future in futures]
            submit()
            yield _collate(samples, records[start : start + len(samples)], store, batch_size)


def benchmark_pipeline(config, num_batches: int, stage: str = "finetune") -> float:
    """Steady-state host pipeline throughput in images/s (decode, augment, batch).

    Warms up for one epoch of batches (plus one), so with `data.cache` the decode cache is full
    and the number measures the augmentation-bound steady state; then times `num_batches`
    batches of `train.batch_size` on this host.
    """
    dataset, store = make_train_dataset(config, stage)
    batches = _HostBatches(dataset, store)
    batch_size = int(config.train.batch_size)
    warmup = -(-len(store.records) // batch_size) + 1
    for _ in range(warmup):
        next(batches)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(batches)
    return num_batches * batch_size / (time.perf_counter() - start)
