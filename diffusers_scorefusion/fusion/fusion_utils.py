"""The fusion maths of ScoreFusion (Liu, Ye, Blanchet, Si, AISTATS 2025), in pure torch.

Nothing here imports Diffusers. Paper symbols: ``lambda`` (the fusion weights, on the simplex) is
``weights``; ``eps_i`` is member ``i``'s prediction; ``alpha_t = sqrt(alphas_cumprod[t])`` and
``sigma_t = sqrt(1 - alphas_cumprod[t])`` define the noised sample ``x_t = alpha_t x0 + sigma_t eps``.
"""

from typing import Callable, Optional, Sequence, Tuple, Union

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
LOSS_WEIGHTINGS = ("uniform", "snr", "min_snr")
WEIGHT_SUM_TOLERANCE = 1e-6

WeightsLike = Union[Sequence[float], Sequence[Sequence[float]], torch.Tensor]


def check_weights(weights: WeightsLike, num_members: int, name: str = "weights") -> torch.Tensor:
    """Validates fusion weights and returns them as a float64 `(num_bins, k)` table (one row if 1-D)."""
    if _has_non_real(weights):
        raise TypeError(f"{name} must be real numbers (not booleans or complex numbers), got {weights!r:.200}")
    try:
        table = torch.as_tensor(weights, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{name} must be a list or tensor of numbers, got {weights!r:.200}") from error
    if table.ndim == 1:
        table = table.unsqueeze(0)
    if table.ndim != 2 or table.shape[0] == 0:
        raise ValueError(
            f"{name} must have shape (k,) or (num_bins, k), got shape {tuple(torch.as_tensor(weights).shape)}"
        )
    if table.shape[1] != num_members:
        raise ValueError(
            f"{name} must have {num_members} entries per row (one per member), got {table.shape[1]}: {table.tolist()}"
        )
    if not torch.isfinite(table).all():
        raise ValueError(f"{name} must be finite, got {table.tolist()}")
    if (table < 0).any():
        raise ValueError(f"{name} must be >= 0, got {table.tolist()}")
    sums = table.sum(dim=1)
    bad_rows = ((sums - 1).abs() > WEIGHT_SUM_TOLERANCE).nonzero().flatten().tolist()
    if bad_rows:
        row = bad_rows[0]
        raise ValueError(
            f"{name} must sum to 1 (tolerance {WEIGHT_SUM_TOLERANCE:g}), got {sums[row].item():.8f} in row {row}: "
            f"{table[row].tolist()}"
        )
    return table


def _has_non_real(value: object) -> bool:
    """True for booleans and complex numbers, also inside lists, tuples, tensors and arrays (which torch would cast)."""
    if isinstance(value, (bool, complex)):
        return True
    dtype = getattr(value, "dtype", None)
    if dtype is not None:  # torch tensors and numpy arrays or scalars
        if isinstance(dtype, torch.dtype):
            return dtype == torch.bool or dtype.is_complex
        return getattr(dtype, "kind", "") in ("b", "c")  # numpy: bool, complex
    if isinstance(value, (list, tuple)):
        return any(_has_non_real(item) for item in value)
    return False


def check_bin_edges(bin_edges: Sequence[float], num_bins: int) -> torch.Tensor:
    """Validates timestep bin edges (``num_bins + 1`` strictly increasing numbers) and returns them as float64."""
    edges = torch.as_tensor(bin_edges, dtype=torch.float64).detach().cpu()
    if edges.ndim != 1 or edges.numel() != num_bins + 1:
        raise ValueError(f"timestep_bin_edges must hold num_bins + 1 = {num_bins + 1} numbers, got {edges.tolist()}")
    if not torch.isfinite(edges).all() or not (edges[1:] > edges[:-1]).all():
        raise ValueError(f"timestep_bin_edges must be finite and strictly increasing, got {edges.tolist()}")
    return edges


def timestep_bins(timesteps: torch.Tensor, bin_edges: torch.Tensor) -> torch.Tensor:
    """Bin index of each timestep: bin ``i`` holds ``edges[i] <= t < edges[i+1]``; outer bins extend to infinity."""
    interior = bin_edges[1:-1].to(device=timesteps.device, dtype=torch.float64)
    return torch.bucketize(timesteps.to(torch.float64), interior, right=True)


def alpha_sigma(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(alpha_t, sigma_t)`` at (possibly fractional) timesteps; fractional ones interpolate the VE log sigma linearly
    between the neighbouring integer timesteps (the inverse of Euler's `_sigma_to_t`)."""
    alphas_cumprod = alphas_cumprod.to(device=timesteps.device, dtype=torch.float64)
    t = timesteps.to(torch.float64).clamp(0, alphas_cumprod.numel() - 1)
    log_sigma = 0.5 * (torch.log1p(-alphas_cumprod) - torch.log(alphas_cumprod))  # log sqrt((1 - a) / a)
    low = t.floor().long()
    high = t.ceil().long()
    frac = t - low
    # integer t reads the table directly: with zero terminal SNR log_sigma[-1] = inf and 0 * inf would give NaN
    log_sigma_t = torch.where(frac == 0, log_sigma[low], (1 - frac) * log_sigma[low] + frac * log_sigma[high])
    # sigma_VE^2 = (1 - a) / a  =>  a = 1 / (1 + sigma_VE^2)
    alpha_sq = torch.sigmoid(-2 * log_sigma_t)
    return alpha_sq.sqrt(), (1 - alpha_sq).sqrt()


def convert_prediction(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_t: torch.Tensor,
    sigma_t: torch.Tensor,
    from_type: str,
    to_type: str,
) -> torch.Tensor:
    """Converts a prediction between ``epsilon``, ``v_prediction`` and ``sample`` for
    ``x_t = alpha_t x0 + sigma_t eps``.

    ``alpha_t`` and ``sigma_t`` are scalars or have shape `(B,)`; the result keeps ``model_output``'s dtype.
    """
    for value in (from_type, to_type):
        if value not in PREDICTION_TYPES:
            raise ValueError(f"prediction type must be one of {PREDICTION_TYPES}, got {value!r}")
    if from_type == to_type:
        return model_output
    shape = (-1,) + (1,) * (sample.ndim - 1)
    alpha = alpha_t.to(sample.device, torch.float64).reshape(shape)  # (B, 1, 1, 1)
    sigma = sigma_t.to(sample.device, torch.float64).reshape(shape)
    x_t, out = sample.to(torch.float64), model_output.to(torch.float64)
    if from_type == "epsilon":
        eps = out
    elif from_type == "v_prediction":
        eps = alpha * out + sigma * x_t  # v = alpha eps - sigma x0
    else:
        eps = (x_t - alpha * out) / sigma
    if to_type == "epsilon":
        converted = eps
    elif to_type == "v_prediction":
        converted = (eps - sigma * x_t) / alpha
    else:
        converted = (x_t - sigma * eps) / alpha
    return converted.to(model_output.dtype)


def combine_predictions(predictions: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``sum_i lambda_i eps_i``: weights of shape `(k,)` or per-sample `(B, k)`, accumulated in float32 or wider."""
    if len(predictions) == 0 or weights.shape[-1] != len(predictions):
        raise ValueError(f"got {len(predictions)} predictions for weights of shape {tuple(weights.shape)}")
    out_dtype = predictions[0].dtype
    acc_dtype = torch.promote_types(out_dtype, torch.float32)
    shape = (-1,) + (1,) * (predictions[0].ndim - 1)
    fused = None
    for i, prediction in enumerate(predictions):
        weight = weights[..., i].to(prediction.device, acc_dtype)
        term = prediction.to(acc_dtype) * (weight if weight.ndim == 0 else weight.reshape(shape))
        fused = term if fused is None else fused + term
    return fused.to(out_dtype)


def denoising_target(
    sample: torch.Tensor, noise: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What a perfect model predicts for ``x_t = alpha_t x0 + sigma_t eps``: ``eps``, ``v = alpha_t eps - sigma_t x0``
    or ``x0``.

    ``sample`` is the clean ``x0`` `(B, ...)`, ``alpha_t`` and ``sigma_t`` have shape `(B,)`; returns float64.
    The ``v_prediction`` target equals Diffusers' ``scheduler.get_velocity(x0, noise, t)``.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if prediction_type == "epsilon":
        return noise.to(torch.float64)
    if prediction_type == "sample":
        return sample.to(torch.float64)
    shape = (-1,) + (1,) * (sample.ndim - 1)
    alpha = alpha_t.to(sample.device, torch.float64).reshape(shape)  # (B, 1, 1, 1)
    sigma = sigma_t.to(sample.device, torch.float64).reshape(shape)
    return alpha * noise.to(torch.float64) - sigma * sample.to(torch.float64)


def loss_weighting(
    timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, weighting: str = "uniform", snr_gamma: float = 5.0
) -> torch.Tensor:
    """w(t) of the score-matching loss: ``uniform`` (1), ``snr`` (SNR(t)) or ``min_snr`` (min(SNR, gamma) / SNR)."""
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
    alpha, sigma = alpha_sigma(alphas_cumprod, timesteps)
    snr = alpha**2 / sigma**2
    if weighting == "uniform":
        return torch.ones_like(snr)
    if weighting == "snr":
        return snr
    return (snr_gamma / snr).clamp(max=1)  # min(SNR, gamma) / SNR, finite (1) at zero terminal SNR


def score_matching_statistics(
    member_outputs: torch.Tensor, target: torch.Tensor, loss_weights: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample terms of ``L(lambda) = lambda^T G lambda - 2 b^T lambda + c`` (mean over dimensions).

    ``member_outputs`` `(k, B, ...)`, ``target`` `(B, ...)`, ``loss_weights`` `(B,)`. Returns ``G`` `(B, k, k)`,
    ``b`` `(B, k)` and ``c`` `(B,)` in float64; averaging them over samples gives the paper's G, b, c.
    """
    if member_outputs.shape[1:] != target.shape:
        raise ValueError(f"member outputs {tuple(member_outputs.shape)} do not match target {tuple(target.shape)}")
    outputs = member_outputs.flatten(2).to(torch.float64)  # (k, B, D)
    flat_target = target.flatten(1).to(torch.float64)  # (B, D)
    dim = flat_target.shape[1]
    gram = torch.einsum("ibd,jbd->bij", outputs, outputs) / dim  # (B, k, k)
    linear = torch.einsum("ibd,bd->bi", outputs, flat_target) / dim  # (B, k)
    constant = (flat_target * flat_target).sum(1) / dim  # (B,)
    if loss_weights is not None:
        w = loss_weights.to(torch.float64)
        gram, linear, constant = gram * w[:, None, None], linear * w[:, None], constant * w
    return gram, linear, constant


def quadratic_loss(
    weights: torch.Tensor, gram: torch.Tensor, linear: torch.Tensor, constant: torch.Tensor
) -> torch.Tensor:
    """``lambda^T G lambda - 2 b^T lambda + c``."""
    weights = weights.to(gram.dtype)
    return weights @ gram @ weights - 2 * linear @ weights + constant


def _solve_on_face(gram: torch.Tensor, linear: torch.Tensor, free: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Minimises the quadratic on the affine hull of the face ``free``: KKT ``G_FF l + mu 1 = b_F, 1^T l = 1``."""
    idx = free.nonzero().flatten()
    n = idx.numel()
    kkt = gram.new_zeros(n + 1, n + 1)
    kkt[:n, :n] = gram[idx][:, idx]
    kkt[:n, n] = 1
    kkt[n, :n] = 1
    rhs = torch.cat([linear[idx], linear.new_ones(1)])
    solution = torch.linalg.lstsq(kkt, rhs.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    residual = (kkt @ solution - rhs).abs().max()
    scale = max(1.0, gram.abs().max().item(), linear.abs().max().item())
    if residual > 1e-8 * scale:
        raise ValueError(
            "the quadratic is unbounded on a face of the simplex: gram must be PSD with linear in its range"
        )
    weights = torch.zeros_like(linear)
    weights[idx] = solution[:n]
    return weights, solution[n]


def solve_simplex_qp(gram: torch.Tensor, linear: torch.Tensor, max_iter: Optional[int] = None) -> torch.Tensor:
    """Exact minimiser of ``lambda^T G lambda - 2 b^T lambda`` over the simplex (primal active-set method).

    Nocedal & Wright, Numerical Optimization, Alg. 16.3, with the equality ``sum(lambda) = 1`` always active.
    ``G`` `(k, k)` symmetric PSD, ``b`` `(k,)`. Weights on inactive members are exactly 0.
    """
    gram = torch.as_tensor(gram, dtype=torch.float64).cpu()
    linear = torch.as_tensor(linear, dtype=torch.float64).cpu()
    k = linear.numel()
    if gram.shape != (k, k) or linear.ndim != 1 or k == 0:
        raise ValueError(f"gram must be (k, k) and linear (k,), got {tuple(gram.shape)} and {tuple(linear.shape)}")
    if not (torch.isfinite(gram).all() and torch.isfinite(linear).all()):
        raise ValueError("gram and linear must be finite")
    gram = 0.5 * (gram + gram.T)
    tol = 1e-12 * max(1.0, gram.abs().max().item(), linear.abs().max().item())
    start = int(torch.argmin(gram.diagonal() - 2 * linear))  # best vertex
    weights = torch.zeros(k, dtype=torch.float64)
    weights[start] = 1.0
    free = torch.zeros(k, dtype=torch.bool)
    free[start] = True
    return active_set_iterations(
        lambda face: _solve_on_face(gram, linear, face), gram, linear, weights, free, tol, max_iter or 100 * (k + 1),
        normalise=lambda w: w / w.sum(),
    )  # fmt: skip


def active_set_iterations(
    solve_face: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]],
    hessian: torch.Tensor,
    linear: torch.Tensor,
    weights: torch.Tensor,
    free: torch.Tensor,
    tol: float,
    max_iter: int,
    normalise: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The primal active-set iterations (Nocedal & Wright, Alg. 16.3) for ``x^T H x - 2 b^T x`` on a product of
    simplices, from the feasible `weights` with the face `free` (changed in place).

    `solve_face(free)` gives the minimiser on that face's affine hull and the equality multiplier of each variable's
    simplex; `normalise` puts the weights back on their simplices after a step (rounding only).
    """
    for _ in range(max_iter):
        target, mu = solve_face(free)
        step = target - weights
        if step.abs().max() <= 1e-12:
            # multipliers of the active bounds lambda_j >= 0: (H lambda - b)_j + mu
            multipliers = hessian @ weights - linear + mu
            multipliers[free] = float("inf")
            j = int(torch.argmin(multipliers))
            if multipliers[j] >= -tol:
                return weights
            free[j] = True
            continue
        shrinking = free & (step < 0)
        ratios = torch.full_like(weights, float("inf"))
        ratios[shrinking] = -weights[shrinking] / step[shrinking]
        blocking = int(torch.argmin(ratios))
        alpha = min(1.0, ratios[blocking].item())
        weights = weights + alpha * step
        if alpha < 1.0:
            weights[blocking] = 0.0
            free[blocking] = False
        weights = normalise(weights.clamp(min=0))
    raise RuntimeError(f"the active-set method did not converge in {max_iter} iterations")
