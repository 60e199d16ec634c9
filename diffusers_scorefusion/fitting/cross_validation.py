"""`num_timestep_bins="auto"`: the number of timestep bins and the smoothness between them, chosen by K-fold
cross-validation of the held-out denoising loss over the target samples.

The exact fit keeps each target sample's quadratic terms ``G``, ``b``, ``c`` per timestep bin (for the bootstrap). Auto
fits accumulate them at the finest candidate resolution (``max_bins`` equal-width bins); coarser candidates (1, 2, 4,
... bins) add neighbouring fine bins, so every candidate, every fold and the final fit come from the one pass: no
member runs again. Per candidate ``(num_bins, tau)`` and fold, the per-bin weights are fitted on the other folds by the
exact joint QP of `fusion/smoothed_qp.py` with the penalty ``rho = tau * num_bins * s`` (``s``: the curvature of the
pooled loss along the simplex, so ``tau`` does not depend on the loss's scale, and ``rho / num_bins`` approximates
``tau s int |dlambda/du|^2 du`` over the bin position ``u`` in [0, 1] whatever the number of bins), then scored on the
fold's samples. The choice is the simplest candidate (fewest bins, then the largest ``tau``) whose cross-validated loss
is within one standard error of the best one's (the standard error of the paired per-sample difference): more bins
must earn their variance.
"""

import math
from typing import Any, Dict, List, Sequence, Tuple

import torch

from ..fusion.smoothed_qp import solve_smoothed_simplex_qp, tangent_curvature
from .fitting_utils import derived_seed

AUTO = "auto"
MAX_AUTO_BINS = 16
RELATIVE_SMOOTHNESS = (0.0, 0.001, 0.01, 0.1, 1.0)  # tau
NUM_FOLDS = 5
RULES = ("one_standard_error", "minimum")


def check_num_timestep_bins(num_timestep_bins: Any, method: str) -> bool:
    """True for `"auto"` (after checking it goes with `method`); False for anything else, which `check_options`
    checks."""
    if isinstance(num_timestep_bins, str):
        if num_timestep_bins != AUTO:
            raise ValueError(f"num_timestep_bins must be an int >= 1 or {AUTO!r}, got {num_timestep_bins!r}")
        if method != "exact":
            raise ValueError(f"num_timestep_bins='auto' needs method='exact', got method={method!r}")
        return True
    return False


def check_auto_samples(num_samples: int) -> None:
    if num_samples < 2:
        raise ValueError(
            f"num_timestep_bins='auto' cross-validates over target samples and needs at least 2, got {num_samples}"
        )


def auto_bin_cap(process: Any) -> int:
    """The finest candidate: `MAX_AUTO_BINS`, or the largest power of 2 within a DDPM range's integer timesteps."""
    bounds = getattr(process, "bounds", None)  # DiffusionProcess: inclusive integer timesteps
    if bounds is None:
        return MAX_AUTO_BINS
    num_timesteps = bounds[1] - bounds[0] + 1
    return min(MAX_AUTO_BINS, 2 ** int(math.floor(math.log2(num_timesteps))))


def coarsen(sums: Dict[str, torch.Tensor], num_bins: int) -> Dict[str, torch.Tensor]:
    """Per-(sample, bin) sums `(N, nb_fine, ...)` added over groups of neighbouring fine bins into `num_bins`."""
    num_samples, fine = sums["count"].shape
    if fine % num_bins:
        raise ValueError(f"{num_bins} bins do not divide the {fine} fine bins")
    factor = fine // num_bins
    return {name: value.reshape(num_samples, num_bins, factor, *value.shape[2:]).sum(2) for name, value in sums.items()}


def penalty(relative_smoothness: float, gram: torch.Tensor, count: torch.Tensor) -> float:
    """``rho = tau * num_bins * s`` from the summed grams `(nb, k, k)` and counts `(nb,)` of the fitting data."""
    pooled = gram.sum(0) / count.sum().clamp(min=1)
    return float(relative_smoothness) * gram.shape[0] * tangent_curvature(pooled)


def solve_binned(gram: torch.Tensor, linear: torch.Tensor, count: torch.Tensor, smoothness: float) -> torch.Tensor:
    """The weights `(nb, k)` minimising the mean loss over the data's noised samples plus the penalty."""
    total = count.sum()
    return solve_smoothed_simplex_qp(gram / total, linear / total, smoothness)


def _fold_of_each_sample(num_samples: int, num_folds: int, seed: int) -> torch.Tensor:
    """A random, balanced fold per sample, `(N,)`, from the fit's shared noise seed (the same on every process)."""
    generator = torch.Generator().manual_seed(derived_seed(seed, 1))
    order = torch.randperm(num_samples, generator=generator)
    folds = torch.empty(num_samples, dtype=torch.long)
    folds[order] = torch.arange(num_samples) % num_folds
    return folds


def _held_out_losses(sums: Dict[str, torch.Tensor], folds: torch.Tensor, num_folds: int, tau: float) -> torch.Tensor:
    """Each sample's summed loss `(N,)` under the weights fitted without its fold; inf where the data leave a bin empty,
    or a training fold does and nothing ties the bin to its neighbours (``tau = 0``)."""
    losses = torch.full((folds.numel(),), math.inf, dtype=torch.float64)
    totals = {name: value.sum(0) for name, value in sums.items()}
    if (totals["count"] == 0).any():  # a bin no sample reached: its weights would rest on nothing
        return losses
    for fold in range(num_folds):
        held = folds == fold
        train = {name: totals[name] - value[held].sum(0) for name, value in sums.items()}
        if (tau == 0 and (train["count"] == 0).any()) or train["count"].sum() == 0:
            losses[held] = math.inf
            continue
        weights = solve_binned(train["gram"], train["linear"], train["count"],
                               penalty(tau, train["gram"], train["count"]))  # fmt: skip
        gram, linear, constant = sums["gram"][held], sums["linear"][held], sums["constant"][held]
        losses[held] = (torch.einsum("bi,nbij,bj->n", weights, gram, weights)
                        - 2 * torch.einsum("bi,nbi->n", weights, linear) + constant.sum(1))  # fmt: skip
    return losses


def _simpler_first(candidates: Sequence[Tuple[int, float]]) -> List[int]:
    return sorted(range(len(candidates)), key=lambda i: (candidates[i][0], -candidates[i][1]))


def select_timestep_bins(
    sums: Dict[str, torch.Tensor],
    bin_edges: torch.Tensor,
    seed: int,
    num_folds: int = NUM_FOLDS,
    relative_smoothness: Sequence[float] = RELATIVE_SMOOTHNESS,
    rule: str = RULES[0],
) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, Dict[str, Any]]:
    """Chooses the bins and smoothness by cross-validation from the fine per-sample sums.

    Args:
        sums (`dict`): per-(sample, fine bin) `gram` `(N, F, k, k)`, `linear` `(N, F, k)`, `constant`, `count`
            `(N, F)`, added over processes; `F` a power of 2.
        bin_edges (`torch.Tensor`): the `F + 1` fine edges.
        seed (`int`): the fit's noise seed (shared by all processes); it places the samples into folds.
        num_folds (`int`), relative_smoothness (`tuple[float]`): the folds (at most one per sample) and the grid of tau.
        rule (`str`): `"one_standard_error"` (the simplest candidate within one standard error of the minimum) or
            `"minimum"` (the minimum of the CV curve).

    Returns:
        The chosen bins' sums `(N, nb, ...)`, their edges (every `F / nb`-th fine edge) and the selection record
        (JSON-ready: `num_timestep_bins`, `relative_smoothness`, `smoothness`, `num_folds`, `rule`, `minimum` and the
        CV `curve`, the held-out loss per noised sample of every candidate with the standard error of its difference
        to the minimum).
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    num_samples, fine = sums["count"].shape
    num_folds = min(num_folds, num_samples)
    folds = _fold_of_each_sample(num_samples, num_folds, seed)
    candidates = [(nb, tau) for nb in (2**j for j in range(int(math.log2(fine)) + 1))
                  for tau in ((0.0,) if nb == 1 else relative_smoothness)]  # fmt: skip
    num_rows = float(sums["count"].sum())
    losses = torch.stack([_held_out_losses(coarsen(sums, nb), folds, num_folds, tau) for nb, tau in candidates])
    cv_loss = losses.sum(1) / num_rows  # (C,): mean held-out loss per noised sample
    best = int(torch.argmin(cv_loss))
    differences = losses - losses[best]  # paired per sample; nan/inf for infeasible candidates
    standard_errors = differences.std(dim=1) * math.sqrt(num_samples) / num_rows
    within = [i for i in _simpler_first(candidates)
              if math.isfinite(cv_loss[i]) and cv_loss[i] - cv_loss[best] <= standard_errors[i]]  # fmt: skip
    chosen = best if rule == "minimum" else within[0]
    num_bins, tau = candidates[chosen]
    coarse = coarsen(sums, num_bins)
    rho = penalty(tau, coarse["gram"].sum(0), coarse["count"].sum(0))

    def number(value: torch.Tensor) -> Any:
        return float(value) if math.isfinite(value) else None

    curve = [dict(num_timestep_bins=nb, relative_smoothness=t, cv_loss=number(cv_loss[i]),
                  standard_error_vs_minimum=number(standard_errors[i]) if i != best else 0.0)
             for i, (nb, t) in enumerate(candidates)]  # fmt: skip
    record = dict(num_timestep_bins=num_bins, relative_smoothness=tau, smoothness=rho, num_folds=num_folds, rule=rule,
                  minimum=dict(num_timestep_bins=candidates[best][0], relative_smoothness=candidates[best][1]),
                  max_timestep_bins=fine, curve=curve)  # fmt: skip
    return coarse, bin_edges[:: fine // num_bins].clone(), record
