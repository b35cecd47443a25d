"""The exported inference function, shared by both ONNX backends (jax2onnx and jax2tf).

`make_inference_fn(model, params, num_mc_samples=T)` returns a pure function: images
`[N, H, W, C]` float32 in [0, 1] → the seven arrays of `interface.OUTPUT_NAMES`, in that order:
anomaly_map `[N, H, W]`, image_score `[N]`, uncertainty `[N]` (MC variance of the image score;
zeros for T = 1), boxes `[N, M, 4]` (x0, y0, x1, y1 pixels, zero past num_boxes), box_scores
`[N, M]`, box_classes `[N, M]` int32, num_boxes `[N]` int32; M = `model.det_max_detections`.
Normalisation, MC dropout with T masks fixed at export (`fixed_dropout`) and box
post-processing are inside the graph. `build_export_model` rebuilds a trained model for export.
Runs in `.venv` and in `.venv-jax2tf` (jax 0.7.1, flax 0.12.0). Design notes (why fixed masks,
the MC statistics, the attention forms): tools/convert_to_onnx/README.md.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from m2u_jax import boxes
from m2u_jax import model as model_lib
from m2u_jax.heads import PER_IMAGE_DET_KEYS
from m2u_jax.vit import unroll_scanned_params

# Attention forms of the exported graph (`model.attention`): 'matmul' exports as MatMul +
# Transpose, faster in ONNX Runtime's CPU provider; 'einsum' as two explicit-letter Einsums,
# the form of earlier exports. Both parse in TensorRT 8.5+ (no `...` in Einsum).
EXPORT_ATTENTION_FORMS = ("matmul", "einsum")


def export_model_config(
    model_config: ml_collections.ConfigDict, *, fp16: bool = False, attention: str = "matmul"
) -> ml_collections.ConfigDict:
    """A copy of `config.model` set up for export: `attention` (one of
    `EXPORT_ATTENTION_FORMS`), `scan_blocks=False`, `remat=False`, `param_dtype='float32'` and
    `dtype` float32 (or float16 with `fp16`). The references to `config.data` (modalities,
    image size) are resolved to plain values."""
    if attention not in EXPORT_ATTENTION_FORMS:
        raise ValueError(f"--attention {attention!r} is not one of {EXPORT_ATTENTION_FORMS}")
    exported = ml_collections.ConfigDict(model_config.to_dict())
    exported.attention = attention
    exported.scan_blocks = False
    exported.remat = False
    exported.dtype = "float16" if fp16 else "float32"
    exported.param_dtype = "float32"
    return exported


def prepare_params(params: dict) -> dict:
    """Trained params → the export layout: the scanned backbone (`scan_*`) unrolled into
    `block_XX` / `fusion_XX`, every floating leaf as float32 numpy (constants of the graph)."""
    params = dict(params)
    if "backbone" in params:
        params["backbone"] = unroll_scanned_params(dict(params["backbone"]))

    def to_float32(leaf):
        leaf = np.asarray(leaf)
        return leaf.astype(np.float32) if np.issubdtype(leaf.dtype, np.floating) else leaf

    return jax.tree.map(to_float32, params)


def dropout_mask(
    module_path: tuple[str, ...], shape: tuple[int, ...], num_samples: int, rate: float, seed: int
) -> np.ndarray:
    """Keep-masks `[num_samples, *shape]` bool of one Dropout module (True = keep, probability
    1 - rate), a pure function of (seed, module path, shape)."""
    path_code = zlib.crc32("/".join(module_path).encode())
    rng = np.random.default_rng([int(seed), path_code])
    return rng.random((num_samples, *shape)) >= rate


@contextlib.contextmanager
def fixed_dropout(num_samples: int, seed: int):
    """While active, a non-deterministic `nn.Dropout` treats its input as `num_samples + 1`
    copies of a batch folded into axis 0 (`[(T + 1) * N, ...]`): copy 0 passes unchanged, copy
    t ≥ 1 is multiplied by mask t of `dropout_mask` and scaled by 1 / (1 - rate), exactly like
    flax's inverted dropout. Deterministic calls return the input (no ONNX Dropout node).

    It replaces `flax.linen.Dropout.__call__` (the only hook that survives jax2onnx, which
    patches that method itself): process-global while active, so trace no other flax model on
    another thread meanwhile."""
    original_call = nn.Dropout.__call__

    def call(self, inputs, deterministic=None, rng=None):
        del rng
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if deterministic or self.rate == 0.0:
            return inputs
        if num_samples < 1:
            raise ValueError("fixed_dropout needs num_samples >= 1 for a non-deterministic call")
        item_shape = tuple(int(size) for size in inputs.shape[1:])
        mask_shape = list(item_shape)
        for axis in self.broadcast_dims:
            if axis % inputs.ndim != 0:  # axis 0 (the batch) is shared by construction
                mask_shape[axis % inputs.ndim - 1] = 1
        keep = dropout_mask(self.scope.path, tuple(mask_shape), num_samples, self.rate, seed)
        keep = np.concatenate([np.ones((1, *mask_shape), bool), keep])  # copy 0: no dropout
        scale = np.full((num_samples + 1,) + (1,) * len(item_shape), 1.0 / (1.0 - self.rate))
        scale[0] = 1.0
        copies = inputs.reshape(num_samples + 1, -1, *item_shape)
        dropped = jnp.where(
            keep[:, None],
            copies * jnp.asarray(scale[:, None], inputs.dtype),
            jnp.zeros((), inputs.dtype),
        )
        return dropped.reshape(-1, *item_shape)

    nn.Dropout.__call__ = call
    try:
        yield
    finally:
        nn.Dropout.__call__ = original_call


def _first_axis_copies(values: jax.Array, copies: int) -> jax.Array:
    """`[copies * N, ...]` → `[copies, N, ...]` (N may be symbolic: the -1 keeps it free)."""
    return values.reshape(copies, -1, *values.shape[1:])


def make_inference_fn(
    model: model_lib.M2UNet,
    params: dict,
    *,
    num_mc_samples: int = 1,
    mc_seed: int = 0,
    members: Sequence[dict] = (),
) -> Callable[[jax.Array], tuple[jax.Array, ...]]:
    """The exportable inference function (module docstring) with `params` closed over (their
    values become constants of the exported graph).

    Args:
      model: an M2UNet built from `export_model_config(...)`.
      params: its `params` tree (e.g. from `prepare_params`).
      num_mc_samples: T ≥ 1, fixed at export.
      mc_seed: seed of the fixed dropout masks.
      members: params trees of further runs of the same model: a deep ensemble with `params`,
        one deterministic pass each (T must be 1). The anomaly map and image score are the
        means over the E members, the uncertainty the variance of their scores (as
        `uncertainty.ensemble_predict`); the boxes are those of `params`.

    Returns:
      `fn(images [N, H, W, C] f32) -> tuple` of the seven arrays in `interface.OUTPUT_NAMES` order.
    """
    inference = inference_with_params(model, num_mc_samples=num_mc_samples, mc_seed=mc_seed)
    if not members:
        return lambda images: inference(params, images)
    if num_mc_samples != 1:
        raise ValueError(
            f"--mc-samples {num_mc_samples} with a deep ensemble: its uncertainty comes from the "
            "members, so the graph is exported with --mc-samples 1"
        )

    def ensemble(images: jax.Array) -> tuple[jax.Array, ...]:
        outputs = [inference(member, images) for member in (params, *members)]
        scores = jnp.stack([output[1] for output in outputs])  # [E, N]
        image_score = jnp.mean(scores, axis=0)
        # Written out, not jnp.var (see the MC branch of `inference_with_params`).
        uncertainty = jnp.mean(jnp.square(scores - image_score), axis=0)
        anomaly_map = jnp.mean(jnp.stack([output[0] for output in outputs]), axis=0)
        return (anomaly_map, image_score, uncertainty, *outputs[0][3:])

    return ensemble


def inference_with_params(
    model: model_lib.M2UNet, *, num_mc_samples: int = 1, mc_seed: int = 0
) -> Callable[[dict, jax.Array], tuple[jax.Array, ...]]:
    """`make_inference_fn` with the params as the first argument: `fn(params, images)` (jax2tf
    keeps them as TF variables of the SavedModel)."""
    if num_mc_samples < 1:
        raise ValueError(f"--mc-samples must be >= 1, got {num_mc_samples}")

    views = model.test_time_flips

    def inference(params: dict, images: jax.Array) -> tuple[jax.Array, ...]:
        variables = {"params": params}
        image_hw = tuple(int(size) for size in images.shape[1:3])
        with fixed_dropout(num_mc_samples, mc_seed):
            tokens = model_lib.views_trunk(model, variables, images)
            if num_mc_samples == 1:
                outputs, _ = model.apply(
                    variables,
                    tokens,
                    image_hw=image_hw,
                    train=False,
                    method=model_lib.M2UNet.stochastic_tail,
                )
                predictions = model_lib.predictions_from_outputs(
                    model_lib.merge_flip_views(outputs, views, model.det_strides),
                    score_kwargs=model.score_kwargs,
                    nms_kwargs=model.nms_kwargs,
                )
                anomaly_map = predictions["anomaly_map"]
                image_score = predictions["image_score"]
                uncertainty = jnp.zeros_like(image_score)
            else:
                copies = num_mc_samples + 1
                outputs, _ = model.apply(
                    variables,
                    # The trunk state is the tokens or a dict with the detail maps too.
                    jax.tree.map(
                        lambda value: jnp.tile(value, (copies,) + (1,) * (value.ndim - 1)),
                        tokens,
                    ),
                    image_hw=image_hw,
                    train=True,
                    method=model_lib.M2UNet.stochastic_tail,
                )
                outputs = _merge_flips_per_copy(outputs, copies, views, model.det_strides)
                scores = model_lib.image_score(outputs, **model.score_kwargs)
                scores = _first_axis_copies(scores, copies)[1:]  # [T, N]
                maps = jax.nn.sigmoid(outputs["pixel_logits"].astype(jnp.float32))
                anomaly_map = jnp.mean(_first_axis_copies(maps, copies)[1:], axis=0)
                image_score = jnp.mean(scores, axis=0)
                # Population variance written out: jnp.var adds where(count > 0, ., nan), which
                # tf2onnx turns into arithmetic with NaN (NaN * 0 = NaN).
                uncertainty = jnp.mean(jnp.square(scores - image_score), axis=0)
                det = dict(outputs["det"])
                for key in PER_IMAGE_DET_KEYS:
                    det[key] = _first_axis_copies(det[key], copies)[0]
                detections = boxes.postprocess(det, **model.nms_kwargs)
                predictions = dict(
                    boxes_xyxy=detections["boxes_xyxy"],
                    box_scores=detections["scores"],
                    box_classes=detections["classes"],
                    box_valid=detections["valid"],
                )
        return (
            anomaly_map.astype(jnp.float32),
            image_score.astype(jnp.float32),
            uncertainty.astype(jnp.float32),
            predictions["boxes_xyxy"].astype(jnp.float32),
            predictions["box_scores"].astype(jnp.float32),
            predictions["box_classes"].astype(jnp.int32),
            jnp.sum(predictions["box_valid"].astype(jnp.int32), axis=1),
        )

    return inference


def _merge_flips_per_copy(
    outputs: dict, copies: int, views: int, det_strides: tuple[int, ...]
) -> dict:
    """Tail outputs of `copies` tiled copies of the `views`·N flipped images (copy-major) → the
    outputs of `copies` copies of the N images, each copy's views merged
    (`model.merge_flip_views`)."""
    if views == 1:
        return outputs
    # What the MC statistics and the boxes read (the reconstruction and embedding are not).
    batched = {name: outputs[name] for name in ("pixel_logits", "image_logits", "type_logits")}
    batched["det"] = {name: outputs["det"][name] for name in PER_IMAGE_DET_KEYS}
    per_copy = jax.tree.map(lambda value: _first_axis_copies(value, copies), batched)
    merged = jax.vmap(lambda copy: model_lib.merge_flip_views(copy, views, det_strides))(per_copy)
    merged = jax.tree.map(lambda value: value.reshape(-1, *value.shape[2:]), merged)
    merged["det"].update(points=outputs["det"]["points"], strides=outputs["det"]["strides"])
    return merged


def build_export_model(
    model_config: ml_collections.ConfigDict,
    params: dict,
    *,
    fp16: bool = False,
    attention: str = "matmul",
) -> tuple[model_lib.M2UNet, dict]:
    """(export model, export params) from the trained `config.model` and its params tree."""
    exported = export_model_config(model_config, fp16=fp16, attention=attention)
    return model_lib.build_model(exported), prepare_params(params)
