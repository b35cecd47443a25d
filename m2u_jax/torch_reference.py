"""PyTorch reference of the M2U-InspectNet backbone, for throughput comparisons only.

It computes what `M2UNet.embed` computes in JAX — the same depth, width, heads, MLP, scales,
patching and token counts — with PyTorch's fast paths: `F.scaled_dot_product_attention` per
scale stream (flash / memory-efficient kernels on GPU), `torch.compile` where it works, and
bf16 autocast on CUDA when `model.dtype` is bfloat16:

- MSPG: the [0, 1] image is mapped to [-1, 1]; every scale is an average-pooled (integer
  factor) or bilinearly resized copy; each modality has its own patch conv (kernel
  `patch_size`, stride `patch_stride`) shared by all scales; several modalities are fused by a
  per-token softmax gate; the learned position table is resampled onto each stream's grid with
  the same interpolation matrices as the JAX model (`m2u_jax.vit.posemb_matrix`), plus a
  per-scale embedding.
- The streams lie end to end on one token axis; pre-LN blocks run their projections and MLP
  (tanh GELU) over all tokens at once and attention per stream; after every `fusion_every`
  blocks a cross-scale fusion lets each stream attend to the others (layer scale).
- A final LayerNorm, then the mean over each stream's tokens, averaged over streams → `[B, D]`.

Parameters are freshly initialised (timing does not depend on their values); the parameter
count equals the JAX backbone's (`count_parameters`), a check that the two are the same
network. `m2u-benchmark --modes torch` runs it (`m2u_jax.benchmark.bench_torch`); importing this
module needs torch, an optional dependency that no other module imports.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable

import ml_collections
import torch
import torch.nn.functional as F
from torch import nn

from m2u_jax.modalities import MODALITY_CHANNELS, split_list
from m2u_jax.vit import VARIANTS, fusion_enabled, posemb_matrix, stream_grids, token_grid


class StreamAttention(nn.Module):
    """Multi-head attention over streams laid end to end: 'self' (each stream attends to
    itself) or 'cross' (each stream attends to all the others)."""

    def __init__(self, width: int, num_heads: int, mode: str):
        super().__init__()
        self.num_heads, self.mode = num_heads, mode
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, tokens: torch.Tensor, lengths: tuple[int, ...]) -> torch.Tensor:
        batch, num_tokens, width = tokens.shape
        head_dim = width // self.num_heads
        qkv = self.qkv(tokens).view(batch, num_tokens, 3, self.num_heads, head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, N, head_dim]
        bounds = list(itertools.accumulate(lengths, initial=0))  # plain ints: no graph break
        spans = [(bounds[i], bounds[i + 1]) for i in range(len(lengths))]
        outputs = []
        for index, (start, stop) in enumerate(spans):
            if self.mode == "self":
                keys, values = key[:, :, start:stop], value[:, :, start:stop]
            else:
                others = [span for other, span in enumerate(spans) if other != index]
                if not others:
                    outputs.append(torch.zeros_like(query[:, :, start:stop]))
                    continue
                keys = torch.cat([key[:, :, a:b] for a, b in others], dim=2)
                values = torch.cat([value[:, :, a:b] for a, b in others], dim=2)
            outputs.append(F.scaled_dot_product_attention(query[:, :, start:stop], keys, values))
        attended = torch.cat(outputs, dim=2).transpose(1, 2).reshape(batch, num_tokens, width)
        return self.out(attended)


class EncoderBlock(nn.Module):
    """Pre-LN transformer block (attention per stream, then a tanh-GELU MLP)."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int):
        super().__init__()
        self.norm_attn = nn.LayerNorm(width, eps=1e-6)
        self.attention = StreamAttention(width, num_heads, "self")
        self.norm_mlp = nn.LayerNorm(width, eps=1e-6)
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)

    def forward(self, tokens: torch.Tensor, lengths: tuple[int, ...]) -> torch.Tensor:
        tokens = tokens + self.attention(self.norm_attn(tokens), lengths)
        hidden = F.gelu(self.fc1(self.norm_mlp(tokens)), approximate="tanh")
        return tokens + self.fc2(hidden)


class CrossScaleFusion(nn.Module):
    """Every stream cross-attends to the others; added through a per-channel layer scale."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.attention = StreamAttention(width, num_heads, "cross")
        self.layer_scale = nn.Parameter(torch.full((width,), 0.1))

    def forward(self, tokens: torch.Tensor, lengths: tuple[int, ...]) -> torch.Tensor:
        return tokens + self.attention(self.norm(tokens), lengths) * self.layer_scale


class Backbone(nn.Module):
    """The MS-ViT backbone → pooled embedding `[B, D]` (see the module docstring)."""

    def __init__(self, model_config: ml_collections.ConfigDict):
        super().__init__()
        variant = VARIANTS[model_config.variant]
        self.width, depth = variant["width"], variant["depth"]
        num_heads, mlp_dim = variant["num_heads"], variant["mlp_dim"]
        self.modalities = split_list(model_config.modalities)
        self.channels = [MODALITY_CHANNELS[name] for name in self.modalities]
        self.image_size = int(model_config.image_size)
        self.scales = tuple(float(scale) for scale in model_config.scales)
        self.patch_size = int(model_config.patch_size)
        self.patch_stride = int(model_config.patch_stride)
        self.stems = nn.ModuleList(
            nn.Conv2d(channels, self.width, self.patch_size, stride=self.patch_stride)
            for channels in self.channels
        )
        if len(self.stems) > 1:
            self.gate_kernel = nn.Parameter(torch.zeros(len(self.stems), self.width))
            self.gate_bias = nn.Parameter(torch.zeros(len(self.stems)))
        self.base = token_grid(self.image_size, self.patch_size, self.patch_stride, 1.0)
        self.pos_embedding = nn.Parameter(0.02 * torch.randn(self.base, self.base, self.width))
        if len(self.scales) > 1:
            self.scale_embedding = nn.Parameter(torch.zeros(len(self.scales), self.width))
        self.fuse = fusion_enabled(len(self.scales), int(model_config.fusion_every))
        self.fusion_every = int(model_config.fusion_every)
        self.blocks = nn.ModuleList(
            EncoderBlock(self.width, num_heads, mlp_dim) for _ in range(depth)
        )
        num_fusions = depth // self.fusion_every if self.fuse else 0
        self.fusions = nn.ModuleList(
            CrossScaleFusion(self.width, num_heads) for _ in range(num_fusions)
        )
        self.encoder_norm = nn.LayerNorm(self.width, eps=1e-6)
        # Interpolation matrices of the position table for `image_size` inputs, as buffers:
        # computed once (numpy) so the forward stays one torch.compile graph.
        grids = stream_grids(
            self.image_size, self.image_size, self.patch_size, self.patch_stride, self.scales
        )
        for index, (scale, (rows, cols)) in enumerate(zip(self.scales, grids)):
            for axis, tokens in (("rows", rows), ("cols", cols)):
                matrix = posemb_matrix(
                    self.base,
                    self.image_size,
                    tokens,
                    self.image_size,
                    patch_size=self.patch_size,
                    patch_stride=self.patch_stride,
                    scale=scale,
                )
                self.register_buffer(f"posemb_{axis}_{index}", torch.as_tensor(matrix))

    def _posemb(self, index: int) -> torch.Tensor:
        rows = getattr(self, f"posemb_rows_{index}")
        cols = getattr(self, f"posemb_cols_{index}")
        return torch.einsum("Hh,Ww,hwd->HWd", rows, cols, self.pos_embedding)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images `[B, H, W, C]` in [0, 1] (channels-last, as in JAX), H = W = image_size →
        `[B, D]`."""
        _, height, width, _ = images.shape
        if height != self.image_size or width != self.image_size:
            raise ValueError(
                f"reference backbone takes {self.image_size}px images, got {height}x{width}"
            )
        grids = stream_grids(height, width, self.patch_size, self.patch_stride, self.scales)
        normalised = images.permute(0, 3, 1, 2) * 2.0 - 1.0
        offsets = list(itertools.accumulate(self.channels, initial=0))
        streams = []
        for index, (scale, (rows, cols)) in enumerate(zip(self.scales, grids)):
            factor = round(1.0 / scale)
            if scale == 1.0:
                scaled = normalised
            elif abs(1.0 / scale - factor) < 1e-9:
                scaled = F.avg_pool2d(normalised, factor)
            else:
                size = (int(height * scale), int(width * scale))
                scaled = F.interpolate(normalised, size, mode="bilinear", antialias=False)
            stem_outputs = [
                stem(scaled[:, offsets[m] : offsets[m + 1]]) for m, stem in enumerate(self.stems)
            ]
            if len(stem_outputs) == 1:
                tokens = stem_outputs[0]
            else:
                stacked = torch.stack(stem_outputs, dim=1)  # [B, M, D, rows, cols]
                logits = torch.einsum("bmdhw,md->bmhw", stacked, self.gate_kernel)
                weights = torch.softmax(logits + self.gate_bias[None, :, None, None], dim=1)
                tokens = torch.einsum("bmhw,bmdhw->bdhw", weights, stacked)
            tokens = tokens.permute(0, 2, 3, 1) + self._posemb(index)
            if len(self.scales) > 1:
                tokens = tokens + self.scale_embedding[index]
            streams.append(tokens.reshape(tokens.shape[0], rows * cols, self.width))
        tokens = torch.cat(streams, dim=1)
        lengths = tuple(rows * cols for rows, cols in grids)
        for block_index, block in enumerate(self.blocks):
            tokens = block(tokens, lengths)
            if self.fuse and (block_index + 1) % self.fusion_every == 0:
                tokens = self.fusions[(block_index + 1) // self.fusion_every - 1](tokens, lengths)
        tokens = self.encoder_norm(tokens)
        means, start = [], 0
        for length in lengths:
            means.append(tokens[:, start : start + length].mean(dim=1))
            start += length
        return torch.stack(means).mean(dim=0)


def count_parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def make_forward(
    config: ml_collections.ConfigDict, *, batch_size: int, use_compile: bool = True
) -> tuple[Callable[[], torch.Tensor], dict]:
    """(forward, info): `forward()` runs the reference backbone (inference mode) on
    `batch_size` fixed random images and returns the embeddings after the device has finished
    (CUDA is synchronised), so a caller can time it like a JAX call.

    `torch.compile` is tried first and compiled by one call here; when it fails (e.g. no C++
    toolchain for inductor) the eager module is used. `info`: `compiled`, `compile_error`,
    `compile_s`, `torch_version`, `torch_device`, `torch_threads`, `autocast_dtype`,
    `parameter_count`.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(int(config.seed))
    module = Backbone(config.model).to(device).eval()
    side = int(config.data.image_size)
    channels = sum(MODALITY_CHANNELS[name] for name in split_list(config.data.modalities))
    images = torch.rand(batch_size, side, side, channels, device=device)
    autocast_dtype = (
        torch.bfloat16 if device.type == "cuda" and config.model.dtype == "bfloat16" else None
    )

    def runner(fn):
        def forward() -> torch.Tensor:
            with torch.inference_mode():
                if autocast_dtype is not None:
                    with torch.autocast("cuda", dtype=autocast_dtype):
                        result = fn(images)
                else:
                    result = fn(images)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return result

        return forward

    forward, compiled, compile_error, compile_s = runner(module), False, None, 0.0
    if use_compile:
        try:
            candidate = runner(torch.compile(module))
            start = time.perf_counter()
            candidate()
            compile_s = time.perf_counter() - start
            forward, compiled = candidate, True
        except Exception as error:  # inductor needs a C++ toolchain; fall back to eager
            compile_error = f"{type(error).__name__}: {str(error)[:200]}"
    info = dict(
        compiled=compiled,
        compile_error=compile_error,
        compile_s=compile_s,
        torch_version=torch.__version__,
        torch_device=str(device),
        torch_threads=torch.get_num_threads(),
        autocast_dtype=None if autocast_dtype is None else str(autocast_dtype),
        parameter_count=count_parameters(module),
    )
    return forward, info
