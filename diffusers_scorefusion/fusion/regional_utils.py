"""Regional fusion weights: per-member masks ``lambda_i(position)``, in pure torch (nothing here imports Diffusers).

A mask table `(k, H, W)` (or `(num_bins, k, H, W)` over timestep bins) gives each member its weight at every position,
non-negative and summing to 1 over the members at every position: ``eps(x)[.., y, x] = sum_i lambda_i[y, x]
eps_i(x)[.., y, x]``, so different members govern different regions of the image at no cost beyond the k forwards
already made. Masks may be given at the latents' resolution or at an integer multiple of it (e.g. the image's, 8x for
Stable Diffusion's VAE): they are then area-averaged to the latents (which keeps them non-negative and summing to 1,
and keeps 0/1 regions aligned with the latent grid exactly 0/1). For packed-token transformers (Flux: `(B, tokens, C)`
with tokens in row-major order of a grid 2x coarser than the latents) masks are averaged to the token grid.
"""

import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

from .fusion_utils import WEIGHT_SUM_TOLERANCE, WeightsLike, _has_non_real, check_weights


def is_mask_table(weights: WeightsLike) -> bool:
    """True for per-member masks: 3-D `(k, H, W)` or 4-D `(num_bins, k, H, W)` weights."""
    return torch.as_tensor(weights).ndim in (3, 4)


def check_weights_or_masks(weights: WeightsLike, num_members: int, name: str = "weights") -> torch.Tensor:
    """[`check_weights`] for `(k,)` / `(num_bins, k)` weights; for masks, a float64 `(num_bins, k, H, W)` table
    refused (one sentence) when negative, not finite, or not summing to 1 over the members at some position."""
    if not is_mask_table(weights):
        return check_weights(weights, num_members, name=name)
    if _has_non_real(weights):
        raise TypeError(f"{name} must be real numbers (not booleans or complex numbers)")
    table = torch.as_tensor(weights, dtype=torch.float64).detach().cpu()
    if table.ndim == 3:
        table = table.unsqueeze(0)
    if table.shape[1] != num_members or table.shape[0] == 0 or min(table.shape[2:]) == 0:
        raise ValueError(
            f"{name} masks must have shape (k, H, W) or (num_bins, k, H, W) with k = {num_members} members, got "
            f"shape {tuple(torch.as_tensor(weights).shape)}"
        )
    if not torch.isfinite(table).all():
        raise ValueError(f"{name} masks must be finite, got non-finite values")
    if (table < 0).any():
        position = [int(i) for i in (table < 0).nonzero()[0]]
        raise ValueError(f"{name} masks must be >= 0 everywhere, got {table[tuple(position)].item():.6g} at "
                         f"(bin, member, y, x) = {tuple(position)}")  # fmt: skip
    sums = table.sum(dim=1)  # (num_bins, H, W)
    bad = (sums - 1).abs() > WEIGHT_SUM_TOLERANCE
    if bad.any():
        position = [int(i) for i in bad.nonzero()[0]]
        raise ValueError(
            f"{name} masks must sum to 1 over the members at every position (tolerance {WEIGHT_SUM_TOLERANCE:g}), "
            f"got {sums[tuple(position)].item():.8f} at (bin, y, x) = {tuple(position)}"
        )
    return table


def _integer_factor(mask_size: Tuple[int, int], size: Tuple[int, int]) -> int:
    """The factor ``f`` with ``mask_size = f * size`` in both dimensions, or 0 when there is none."""
    (height, width), (h, w) = mask_size, size
    if height % h or width % w or height // h != width // w:
        return 0
    return height // h


def masks_to_resolution(masks: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """`(k, H, W)` masks at the latents' `size` ``(h, w)``: as they are, or area-averaged from ``f`` times it."""
    mask_size = tuple(masks.shape[-2:])
    if mask_size == tuple(size):
        return masks
    factor = _integer_factor(mask_size, size)
    if factor == 0:
        raise ValueError(
            f"fusion weight masks of size {mask_size} fit neither the latents' resolution {tuple(size)} nor an integer "
            f"multiple of it (the image's, e.g. {(size[0] * 8, size[1] * 8)} for an 8x VAE)"
        )
    return F.avg_pool2d(masks.unsqueeze(0), factor).squeeze(0)


def masks_to_tokens(masks: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """`(k, H, W)` masks averaged to a row-major token grid of `num_tokens` cells with the masks' aspect ratio:
    `(k, num_tokens)`."""
    height, width = masks.shape[-2:]
    factor = math.isqrt(max(1, height * width // max(1, num_tokens)))
    if factor < 1 or height % factor or width % factor or (height // factor) * (width // factor) != num_tokens:
        raise ValueError(
            f"fusion weight masks of size {(height, width)} cannot be mapped to {num_tokens} tokens: the token grid "
            f"must be the masks' grid divided by an integer factor"
        )
    return masks_to_resolution(masks, (height // factor, width // factor)).flatten(1)


def combine_masked_predictions(predictions: Sequence[torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
    """``sum_i lambda_i(position) eps_i``: `(k, H, W)` masks with predictions `(B, C, h, w)` (masks resized to
    ``(h, w)``) or packed tokens `(B, tokens, C)`; accumulated in float32 or wider, as `combine_predictions`."""
    if len(predictions) == 0 or masks.shape[0] != len(predictions):
        raise ValueError(f"got {len(predictions)} predictions for masks of shape {tuple(masks.shape)}")
    reference = predictions[0]
    if reference.ndim == 4:
        weights = masks_to_resolution(masks, tuple(reference.shape[-2:]))[:, None, None]  # (k, 1, 1, h, w)
    elif reference.ndim == 3:
        weights = masks_to_tokens(masks, reference.shape[1])[:, None, :, None]  # (k, 1, tokens, 1)
    else:
        raise ValueError(
            f"regional weights need (B, C, H, W) or (B, tokens, C) predictions, got {tuple(reference.shape)}"
        )
    acc_dtype = torch.promote_types(reference.dtype, torch.float32)
    fused = None
    for i, prediction in enumerate(predictions):
        term = prediction.to(acc_dtype) * weights[i].to(prediction.device, acc_dtype)
        fused = term if fused is None else fused + term
    return fused.to(reference.dtype)
