"""Anomaly scorers compared on one trained run: which map finds the defects best.

    python tools/scorer_study.py --workdir runs/quality/mt_unsup [--step N] [--out FILE.md]

On the run's test split, each scorer gives an anomaly map per image; the table reports image
AUROC (maximum of the 5×5 mean-filtered map, the `cpu_real` rule), pixel AUROC and AUPRO:

- `pixel head`: the model's anomaly map (what evaluation reports);
- `pixel head, tiled` (runs trained on `data.train_crop` crops only): the same head run on
  overlapping crop-size tiles of the image and stitched (`m2u_jax.predictor`'s tiling, overlap
  `predictor.TILE_OVERLAP`), so the model sees the scale and positions it was trained at;
- `pixel head, 4 flips`: the mean of the head's maps of the image and its three flips
  (`model.test_time_flips=4`, whatever the run's own setting);
- `reconstruction error`: mean |input − reconstruction| over channels;
- `memory: tokens`, `memory: tokens + detail`, `memory: detail`: nearest-neighbour distance to
  a memory of defect-free training patches (`m2u_jax.feature_memory`) over the fused token grid
  (stride `patch_stride`), the token grid with the detail stem's maps pooled to its stride, or
  the detail maps at stride 4 (stride-2 map pooled in); each part L2-normalised before joining;
- `A + B`: maps standardised by the mean and standard deviation of their pixels on the
  defect-free *validation* images, then summed (no test label is used).
- `gaussian: embedding`, `gaussian: token statistics` (image scores only, no map): CutPaste's
  density estimator, the squared Mahalanobis distance of an image's pooled features to a
  Gaussian fitted on the defect-free training images (covariance shrunk toward its mean
  variance by `GAUSSIAN_SHRINKAGE`), over the backbone's pooled embedding or the mean, standard
  deviation and maximum of the fused token grid; `pixel head + gaussian: …` sums the two image
  scores, each standardised on the defect-free validation images.

Detail-stem scorers need `model.detail_channels > 0` and are skipped otherwise. Memories hold
`eval.feature_memory_size` patches (`DEFAULT_MEMORY_SIZE` when the run had it off). The numbers
back the choice of the default scorer in docs/quality.md.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import sys

if __package__ in (None, ""):  # `python tools/scorer_study.py` from anywhere
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from m2u_jax import evaluate, feature_memory, run_checkpoint, scoring  # noqa: E402
from m2u_jax import metrics as metrics_lib  # noqa: E402
from m2u_jax import model as model_lib  # noqa: E402
from m2u_jax import predictions as predictions_lib  # noqa: E402
from m2u_jax import predictor as predictor_lib  # noqa: E402

PIXEL_HEAD, RECON_ERROR = "pixel head", "reconstruction error"
TILED_PIXEL_HEAD = "pixel head, tiled"
FLIPPED_PIXEL_HEAD = "pixel head, 4 flips"
MEMORY_SETS = {  # scorer name → feature set of `_features`
    "memory: tokens": "tokens",
    "memory: tokens + detail": "tokens_detail",
    "memory: detail": "detail",
}
FUSIONS = (
    (PIXEL_HEAD, "memory: tokens"),
    (PIXEL_HEAD, "memory: tokens + detail"),
    (PIXEL_HEAD, "memory: detail"),
    (PIXEL_HEAD, RECON_ERROR),
    (FLIPPED_PIXEL_HEAD, "memory: tokens"),
)
GAUSSIAN_SETS = {  # image-level scorer name → feature set of `_features`
    "gaussian: embedding": "embedding",
    "gaussian: token statistics": "token_stats",
}
GAUSSIAN_SHRINKAGE = 0.1
IMAGE_SCORE_SMOOTHING = 5
DEFAULT_MEMORY_SIZE = 16384  # cpu_real's eval.feature_memory_size


def _mean_pool(maps: jax.Array, factor: int) -> jax.Array:
    """`[B, H, W, C]` → `[B, H/factor, W/factor, C]` (mean over factor×factor cells)."""
    if factor == 1:
        return maps
    window = (1, factor, factor, 1)
    return jax.lax.reduce_window(maps, 0.0, jax.lax.add, window, window, "VALID") / factor**2


def _unit(features: jax.Array) -> jax.Array:
    """Each feature vector scaled to unit length (so joined parts weigh alike)."""
    return features / (jnp.linalg.norm(features, axis=-1, keepdims=True) + 1e-6)


@functools.partial(jax.jit, static_argnums=0)
def _features(model, variables, images: jax.Array) -> dict[str, jax.Array]:
    """images → the pixel-head map, the reconstruction error and the memory feature sets."""
    # The trunk once: its detail maps feed both the heads and the detail feature sets.
    state, _ = model.apply(variables, images, method=model_lib.M2UNet.trunk)
    outputs, aux = model.apply(
        variables,
        state,
        image_hw=images.shape[1:3],
        train=False,
        method=model_lib.M2UNet.stochastic_tail,
    )
    images = images.astype(jnp.float32)
    recon_error = jnp.mean(jnp.abs(outputs["recon"].astype(jnp.float32) - images), axis=-1)
    tokens = aux["fine_grid"].astype(jnp.float32)
    flat_tokens = tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])
    result = {
        PIXEL_HEAD: jax.nn.sigmoid(outputs["pixel_logits"].astype(jnp.float32)),
        RECON_ERROR: recon_error,
        "tokens": feature_memory.neighbourhood_mean(tokens),
        "embedding": outputs["embedding"].astype(jnp.float32),
        "token_stats": jnp.concatenate(
            [flat_tokens.mean(1), flat_tokens.std(1), flat_tokens.max(1)], axis=-1
        ),
    }
    if model.detail_channels > 0:
        detail = {stride: maps.astype(jnp.float32) for stride, maps in state["detail"].items()}
        token_stride = images.shape[1] // tokens.shape[1]
        pooled = [_unit(_mean_pool(maps, token_stride // s)) for s, maps in detail.items()]
        joined = jnp.concatenate([_unit(tokens)] + pooled, -1)
        result["tokens_detail"] = feature_memory.neighbourhood_mean(joined)
        fine = [_unit(_mean_pool(maps, 4 // s)) for s, maps in detail.items() if s <= 4]
        result["detail"] = feature_memory.neighbourhood_mean(jnp.concatenate(fine, -1))
    return result


def tiled_anomaly_maps(model, variables, images: np.ndarray, tile: int) -> np.ndarray:
    """`[B, S, S]` anomaly maps of `images [B, S, S, C]` predicted on overlapping `tile`-pixel
    tiles (one batch of B x tiles) and stitched with the Predictor's blending."""
    size = images.shape[1]
    starts = predictor_lib.tile_origins(size, tile, predictor_lib.TILE_OVERLAP)
    origins = [(top, left) for top in starts for left in starts]
    crops = np.concatenate([images[:, t : t + tile, x : x + tile] for t, x in origins])
    maps = np.asarray(model_lib.predict(model, variables, jnp.asarray(crops))["anomaly_map"])
    maps = maps.reshape(len(origins), len(images), tile, tile)  # tile-major, as concatenated
    return np.stack(
        [
            predictor_lib.stitch(list(maps[:, i]), origins, size, size, predictor_lib.TILE_OVERLAP)
            for i in range(len(images))
        ]
    )


def standardise(maps: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`maps` minus the mean of `reference`'s pixels, divided by their standard deviation."""
    return (maps - reference.mean()) / (reference.std() + 1e-12)


def gaussian_distances(
    normal: np.ndarray, features: np.ndarray, shrinkage: float = GAUSSIAN_SHRINKAGE
) -> np.ndarray:
    """Squared Mahalanobis distance of each row of `features [N, D]` to the Gaussian fitted on
    `normal [M, D]`: its mean, and its covariance (ddof 1) shrunk as (1 − s)·C + s·mean(diag C)·I,
    which keeps it invertible when M is not far above D."""
    normal = np.asarray(normal, np.float64)
    mean = normal.mean(axis=0)
    covariance = np.atleast_2d(np.cov(normal, rowvar=False))
    covariance = (1.0 - shrinkage) * covariance + shrinkage * np.mean(np.diag(covariance)) * np.eye(
        len(covariance)
    )
    centred = np.asarray(features, np.float64) - mean
    return np.einsum("nd,nd->n", centred @ np.linalg.inv(covariance), centred)


def map_image_scores(maps: np.ndarray) -> np.ndarray:
    """`[N]` image scores of `[N, H, W]` maps: the maximum of the mean-filtered map."""
    smoothed = scoring.smooth_maps(maps.astype(np.float32), IMAGE_SCORE_SMOOTHING)
    return scoring.topk_mean(smoothed, 0.0)


def scorer_metrics(labels, masks, maps: np.ndarray) -> dict[str, float]:
    """Image AUROC (max of the mean-filtered map), pixel AUROC and AUPRO of `[N, H, W]` maps."""
    return {
        "image_auroc": metrics_lib.image_auroc(labels, map_image_scores(maps)),
        "pixel_auroc": metrics_lib.pixel_auroc(masks, maps),
        "aupro": metrics_lib.aupro(masks, maps, evaluate.AUPRO_FPR_LIMIT),
    }


def run_study(config, workdir: str, step: int | str | None = None) -> tuple[int, dict[str, dict]]:
    """(checkpoint step, {scorer: metrics}) for every scorer of the module docstring."""
    params, step = run_checkpoint.restore_params(config, workdir, step)
    model = model_lib.build_model(config.model)
    variables = {"params": params}

    flipped = model.clone(test_time_flips=4)
    tile = int(config.data.train_crop)

    def predictor_for(split: str):
        def predict(images, batch_index):
            del batch_index
            result = predictions_lib.to_host(_features(model, variables, jnp.asarray(images)))
            if split != "train":
                result[FLIPPED_PIXEL_HEAD] = np.asarray(
                    model_lib.predict(flipped, variables, jnp.asarray(images))["anomaly_map"]
                )
            if tile and split != "train":  # the memories read the train split, maps do not
                images = np.asarray(images, np.float32)
                result[TILED_PIXEL_HEAD] = tiled_anomaly_maps(model, variables, images, tile)
            return result

        return predict

    splits = {
        name: predictions_lib.collect_split(
            config, name, predictor_for(name), keep_maps=name == "test"
        )
        for name in ("train", "validation", "test")
    }
    train, validation, test = splits["train"], splits["validation"], splits["test"]
    good_train, good_validation = train["labels"] == 0, validation["labels"] == 0
    maps = {
        name: {"validation": validation[name], "test": test[name]}
        for name in (PIXEL_HEAD, RECON_ERROR, TILED_PIXEL_HEAD, FLIPPED_PIXEL_HEAD)
        if name in test
    }
    image_hw = test[PIXEL_HEAD].shape[1:]
    for scorer, key in MEMORY_SETS.items():
        if key not in train or not good_train.any():
            continue
        size = int(config.eval.feature_memory_size) or DEFAULT_MEMORY_SIZE
        bank = jnp.asarray(feature_memory.build_bank([train[key][good_train]], size, config.seed))
        maps[scorer] = {}
        for split_name in ("validation", "test"):
            features = splits[split_name][key]
            grids = [
                feature_memory.nearest_distances(bank, jnp.asarray(features[i : i + 32]))
                for i in range(0, len(features), 32)
            ]
            maps[scorer][split_name] = feature_memory.upsample_maps(np.concatenate(grids), image_hw)
    results = {
        name: scorer_metrics(test["labels"], test["masks"], pair["test"])
        for name, pair in maps.items()
    }
    if good_validation.any():
        for parts in FUSIONS:
            if all(part in maps for part in parts):
                fused = sum(
                    standardise(maps[p]["test"], maps[p]["validation"][good_validation])
                    for p in parts
                )
                results[" + ".join(parts)] = scorer_metrics(test["labels"], test["masks"], fused)
    if good_train.any():  # image-level scorers: no map, so no pixel AUROC or AUPRO
        head = {name: map_image_scores(maps[PIXEL_HEAD][name]) for name in ("validation", "test")}
        for scorer, key in GAUSSIAN_SETS.items():
            normal = train[key][good_train]
            scores = {name: gaussian_distances(normal, splits[name][key]) for name in head}
            image_only = dict(pixel_auroc=None, aupro=None)
            results[scorer] = {
                "image_auroc": metrics_lib.image_auroc(test["labels"], scores["test"]),
                **image_only,
            }
            if good_validation.any():
                fused = sum(
                    standardise(part["test"], part["validation"][good_validation])
                    for part in (head, scores)
                )
                results[f"{PIXEL_HEAD} + {scorer}"] = {
                    "image_auroc": metrics_lib.image_auroc(test["labels"], fused),
                    **image_only,
                }
    return step, results


def markdown(step: int, workdir: str, results: dict[str, dict]) -> str:
    lines = [
        f"Run `{workdir}`, checkpoint {step}, test split.",
        "",
        f"| scorer | image AUROC (max {IMAGE_SCORE_SMOOTHING}×{IMAGE_SCORE_SMOOTHING}) "
        "| pixel AUROC | AUPRO |",
        "|---|---|---|---|",
    ]
    for name, row in results.items():
        cells = " | ".join(
            "—" if row[key] is None else f"{row[key]:.3f}"
            for key in ("image_auroc", "pixel_auroc", "aupro")
        )
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv) -> int:
    del argv
    from m2u_jax import config as config_lib

    try:
        config = config_lib.load_run_config(_WORKDIR.value)
        config_lib.validate(config)
        step = _STEP.value or None
        if step not in (None, "best"):
            if not step.isdigit():
                raise ValueError(f"--step={step!r}: expected a step number or 'best'")
            step = int(step)
        step, results = run_study(config, _WORKDIR.value, step)
    except (ValueError, FileNotFoundError, config_lib.ConfigError) as error:
        print(f"scorer_study.py: {error}", file=sys.stderr)
        return 2
    text = markdown(step, _WORKDIR.value, results)
    print(text)
    if _OUT.value:
        with open(_OUT.value, "w", encoding="utf-8") as file:
            file.write(text)
        with open(os.path.splitext(_OUT.value)[0] + ".json", "w", encoding="utf-8") as file:
            json.dump({"step": step, "results": results}, file, indent=1)
    return 0


if __name__ == "__main__":
    from absl import app, flags

    from m2u_jax import host_memory

    host_memory.keep_freed_memory()  # first, before JAX's threads start (as train.py)

    _WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by train.py.")
    _STEP = flags.DEFINE_string("step", "", "Checkpoint step or 'best' ('' = the run's default).")
    _OUT = flags.DEFINE_string("out", "", "Also write the table here (and FILE.json).")
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
