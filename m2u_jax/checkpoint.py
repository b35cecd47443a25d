"""Public ViT checkpoints (`.npz`, big_vision / AugReg key layout) → the M2UNet backbone.

`load_vit_npz(path, params)` understands both layouts of Google's ViT code. Keys may carry a
`params/`, `opt/target/` or `params/img/` prefix; `<blk>` is `Transformer/encoderblock_<i>`:

    embedding/kernel [p, p, c, D], embedding/bias [D]  -> embed/stem_<modality> (every modality)
    pos_embedding | Transformer/pos_embedding | Transformer/posembed_input/pos_embedding
        [1, n² (+1), D]                                -> embed/pos_embedding
    <blk>/LayerNorm_0/{scale,bias}                     -> block_<i>/norm_attn
    <blk>/MultiHeadDotProductAttention_{0,1}/{query,key,value}/kernel [D, H, hd], bias [H, hd]
                                                       -> block_<i>/attention/qkv (axis 1 / 0)
    <blk>/MultiHeadDotProductAttention_{0,1}/out/{kernel [H, hd, D], bias}
                                                       -> block_<i>/attention/out
    <blk>/LayerNorm_{1,2}/{scale,bias}                 -> block_<i>/norm_mlp
    <blk>/MlpBlock_{0,3}/Dense_0, Dense_1              -> block_<i>/mlp/fc1, fc2
    Transformer/encoder_norm/{scale,bias}              -> encoder_norm

(`_1`/`_2`/`_3` are the AugReg / vit_jax names, `_0`/`_1`/`_0` big_vision's.) A scanned
big_vision checkpoint (`Transformer/encoderblock/...` with a leading depth axis) is unstacked.

Adaptations, all logged:
- the class token (`cls`, and the first position when there are n² + 1) is dropped: the
  backbone pools by averaging;
- the position table is resampled bilinearly (half-pixel, no antialias) from n × n to the
  model's scale-1 grid; with `posemb='sincos2d'` it is skipped (fixed embedding);
- a patch kernel of another size is resized with the pseudo-inverse of the bilinear resize
  (FlexiViT's PI-resize): tokens of a resized patch match the original tokens exactly when the
  model patch is larger, in the least-squares sense when smaller;
- the 3-channel kernel goes to the `rgb` stem; a 1-channel stem (thermal, x-ray, depth) gets the
  kernel summed over colour channels — exactly what the RGB filter gives on a grey image;
- classifier heads (`head`, `pre_logits`, `MAPHead_0`) are ignored.

Any other key, a block the model does not have, or a shape that does not fit raises ValueError
naming the key and both shapes. Cross-scale fusions, scale embeddings and the heads keep their
initial values.
"""

from __future__ import annotations

import logging
import re
import zipfile

import numpy as np

from m2u_jax.layers import resize_matrix
from m2u_jax.vit import scan_params_like, unroll_scanned_params

_PREFIXES = ("opt/target/", "params/img/", "params/", "img/")
_IGNORED = re.compile(r"^(cls|head/.*|pre_logits/.*|MAPHead_0/.*)$")
_POSEMB_KEYS = (
    "pos_embedding",
    "Transformer/pos_embedding",
    "Transformer/posembed_input/pos_embedding",
)
_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/(.+)$")
_SCANNED_BLOCK = re.compile(r"^Transformer/encoderblock/(.+)$")
_BLOCK_LEAVES = {
    r"LayerNorm_0/(scale|bias)": "norm_attn",
    r"MultiHeadDotProductAttention_[01]/(query|key|value)/(kernel|bias)": "attention/qkv",
    r"MultiHeadDotProductAttention_[01]/out/(kernel|bias)": "attention/out",
    r"LayerNorm_[12]/(scale|bias)": "norm_mlp",
    r"MlpBlock_[03]/Dense_0/(kernel|bias)": "mlp/fc1",
    r"MlpBlock_[03]/Dense_1/(kernel|bias)": "mlp/fc2",
}
_QKV_INDEX = {"query": 0, "key": 1, "value": 2}

log = logging.getLogger(__name__)


def _strip_prefix(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _read_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {_strip_prefix(key): np.asarray(archive[key]) for key in archive.files}
    except FileNotFoundError:
        raise FileNotFoundError(f"ViT checkpoint {path} does not exist") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:  # truncated: BadZipFile
        raise ValueError(f"ViT checkpoint {path} is not a readable .npz file: {error}") from None
    # A scanned big_vision encoder stores every block under one name with a depth axis.
    for key in [k for k in arrays if _SCANNED_BLOCK.match(k)]:
        stacked = arrays.pop(key)
        rest = _SCANNED_BLOCK.match(key).group(1)
        for index in range(stacked.shape[0]):
            arrays[f"Transformer/encoderblock_{index}/{rest}"] = stacked[index]
    return arrays


def pi_resize_patch_kernel(kernel: np.ndarray, new_size: int) -> np.ndarray:
    """PI-resize (FlexiViT) of a `[p, p, c, D]` patch kernel to `[new, new, c, D]`: solves
    `B^T w' = w` in the least-squares sense, B the bilinear resize of a p×p patch to new×new,
    so `<B x, w'> = <x, w>` for every patch x (exactly when new ≥ p)."""
    old_size = kernel.shape[0]
    if old_size == new_size:
        return kernel
    rows = resize_matrix(old_size, new_size).astype(np.float64)  # [new, old]
    resize = np.kron(rows, rows)  # [new², old²] acting on row-major flattened patches
    flat = kernel.reshape(old_size * old_size, -1).astype(np.float64)
    resized = np.linalg.pinv(resize.T) @ flat
    return resized.reshape(new_size, new_size, *kernel.shape[2:]).astype(kernel.dtype)


def _check_shape(key: str, array: np.ndarray, expected: tuple) -> None:
    if tuple(array.shape) != tuple(expected):
        raise ValueError(
            f"checkpoint key '{key}' has shape {tuple(array.shape)} but the model expects "
            f"{tuple(expected)}"
        )


def _set(tree: dict, path: str, value: np.ndarray, key: str) -> None:
    """Writes `value` at '/'-separated `path` of `tree` after a shape check; keeps the dtype."""
    node = tree
    parts = path.split("/")
    for part in parts[:-1]:
        if part not in node:
            raise ValueError(f"checkpoint key '{key}' maps to '{path}', which the model lacks")
        node = node[part]
    if parts[-1] not in node:
        raise ValueError(f"checkpoint key '{key}' maps to '{path}', which the model lacks")
    target = node[parts[-1]]
    _check_shape(key, value, target.shape)
    node[parts[-1]] = np.asarray(value, dtype=target.dtype)


def _load_stems(arrays, embed: dict, loaded: set) -> None:
    stems = sorted(name for name in embed if name.startswith("stem_"))
    for leaf in ("kernel", "bias"):
        key = f"embedding/{leaf}"
        if key not in arrays:
            continue
        loaded.add(key)
        value = arrays[key]
        for stem in stems:
            target = embed[stem][leaf]
            if leaf == "bias":
                _set(embed, f"{stem}/bias", value, key)
                continue
            if value.ndim != 4 or value.shape[0] != value.shape[1]:
                _check_shape(key, value, target.shape)
            kernel = pi_resize_patch_kernel(value, target.shape[0])
            if kernel.shape[2] != target.shape[2]:
                if target.shape[2] != 1:
                    _check_shape(key, value, target.shape)
                kernel = kernel.sum(axis=2, keepdims=True)
            _set(embed, f"{stem}/kernel", kernel, key)
        log.info("loaded %s into %s", key, stems)


def _load_posemb(arrays, embed: dict, loaded: set) -> None:
    present = [key for key in _POSEMB_KEYS if key in arrays]
    for key in present:
        loaded.add(key)
    if not present:
        return
    key = present[0]
    table = arrays[key]
    if "pos_embedding" not in embed:
        log.info("skipped %s: the model uses a fixed sin-cos position embedding", key)
        return
    target = embed["pos_embedding"]
    if table.ndim != 3 or table.shape[0] != 1 or table.shape[2] != target.shape[2]:
        _check_shape(key, table, target.shape)
    tokens = table.shape[1]
    side = int(round(np.sqrt(tokens)))
    if side * side != tokens:
        side = int(round(np.sqrt(tokens - 1)))
        if side * side + 1 != tokens:
            raise ValueError(
                f"checkpoint key '{key}' has {tokens} positions: neither n² nor n² + 1"
            )
        table = table[:, 1:]  # the class token's position
        log.info("dropped the class-token position of %s", key)
    target_side = int(round(np.sqrt(target.shape[1])))
    grid = table.reshape(side, side, -1).astype(np.float64)
    if side != target_side:
        matrix = resize_matrix(side, target_side).astype(np.float64)
        grid = np.einsum("Hh,hwd->Hwd", matrix, grid)
        grid = np.einsum("Ww,hwd->hWd", matrix, grid)
        log.info("resampled %s from %dx%d to %dx%d", key, side, side, target_side, target_side)
    _set(embed, "pos_embedding", grid.reshape(1, target_side * target_side, -1), key)


def _load_blocks(arrays, backbone: dict, loaded: set) -> None:
    qkv_parts: dict[tuple[int, str], dict[str, tuple[str, np.ndarray]]] = {}
    for key, value in arrays.items():
        match = _BLOCK.match(key)
        if not match:
            continue
        index, rest = int(match.group(1)), match.group(2)
        block = f"block_{index:02d}"
        if block not in backbone:
            depth = sum(1 for name in backbone if name.startswith("block_"))
            raise ValueError(
                f"checkpoint key '{key}' belongs to encoder block {index}, but the model has "
                f"{depth} blocks"
            )
        for pattern, target in _BLOCK_LEAVES.items():
            leaf_match = re.fullmatch(pattern, rest)
            if not leaf_match:
                continue
            loaded.add(key)
            if target == "attention/qkv":
                projection, leaf = leaf_match.group(1), leaf_match.group(2)
                qkv_parts.setdefault((index, leaf), {})[projection] = (key, value)
            else:
                _set(backbone[block], f"{target}/{leaf_match.group(1)}", value, key)
            break
        else:
            raise ValueError(f"checkpoint key '{key}' is not a ViT encoder-block parameter")
    for (index, leaf), parts in sorted(qkv_parts.items()):
        missing = sorted(set(_QKV_INDEX) - set(parts))
        if missing:
            raise ValueError(
                f"checkpoint block {index} has attention {sorted(parts)} {leaf}s but lacks "
                f"{missing}"
            )
        target = backbone[f"block_{index:02d}"]["attention"]["qkv"][leaf]
        axis = 1 if leaf == "kernel" else 0
        expected = tuple(np.delete(np.asarray(target.shape), axis))
        for key, value in parts.values():
            _check_shape(key, value, expected)
        stacked = np.stack([parts[name][1] for name in ("query", "key", "value")], axis=axis)
        _set(backbone[f"block_{index:02d}"], f"attention/qkv/{leaf}", stacked, parts["query"][0])


def load_vit_npz(path: str, params: dict) -> dict:
    """Loads a big_vision / AugReg ViT `.npz` into the backbone of M2UNet parameters.

    Args:
      path: the `.npz` file (read with `allow_pickle=False`).
      params: M2UNet parameters `{'backbone': ..., ...}` or variables `{'params': {...}}`
        (arrays or `jax.ShapeDtypeStruct`-like leaves with `.shape`/`.dtype`), unrolled or
        scanned layout.

    Returns:
      A new tree of the same structure (numpy leaves where loaded, the input leaves elsewhere),
      the input untouched. See the module docstring for the mapping and the errors.
    """
    if "params" in params and "backbone" not in params:
        return {**params, "params": load_vit_npz(path, params["params"])}
    if "backbone" not in params:
        raise ValueError(
            f"load_vit_npz expects M2UNet params with a 'backbone'; got {list(params)}"
        )
    arrays = _read_npz(path)
    backbone_in = params["backbone"]
    # Work on a mutable, unrolled copy (dict containers, shared leaves).
    backbone = _to_mutable(unroll_scanned_params(dict(backbone_in)))
    loaded: set[str] = set()
    _load_stems(arrays, backbone["embed"], loaded)
    _load_posemb(arrays, backbone["embed"], loaded)
    _load_blocks(arrays, backbone, loaded)
    for leaf in ("scale", "bias"):
        key = f"Transformer/encoder_norm/{leaf}"
        if key in arrays:
            _set(backbone["encoder_norm"], leaf, arrays[key], key)
            loaded.add(key)
    ignored = sorted(key for key in arrays if key not in loaded and _IGNORED.match(key))
    unknown = sorted(key for key in arrays if key not in loaded and not _IGNORED.match(key))
    if unknown:
        raise ValueError(
            f"checkpoint {path} has key(s) the backbone cannot take: {unknown[:5]}"
            + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        )
    if ignored:
        log.info("ignored classifier keys of %s: %s", path, ignored)
    model_blocks = sum(1 for name in backbone if name.startswith("block_"))
    checkpoint_blocks = {int(m.group(1)) for k in loaded if (m := _BLOCK.match(k))}
    if len(checkpoint_blocks) < model_blocks:
        log.warning(
            "checkpoint %s has %d encoder blocks; the model's other %d keep their init",
            path,
            len(checkpoint_blocks),
            model_blocks - len(checkpoint_blocks),
        )
    restored = scan_params_like(backbone, backbone_in)
    return {**params, "backbone": restored}


def _to_mutable(tree):
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {key: _to_mutable(value) for key, value in tree.items()}
    return tree
