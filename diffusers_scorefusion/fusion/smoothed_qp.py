"""Per-bin fusion weights tied by a smoothness penalty between neighbouring timestep bins, in pure torch.

With one weight vector ``lambda_b`` per timestep bin ``b`` (each on the simplex), the binned score-matching loss plus a
quadratic penalty on the change between neighbouring bins,

``sum_b (lambda_b^T G_b lambda_b - 2 b_b^T lambda_b) + rho sum_b || lambda_{b+1} - lambda_b ||^2``,

is one convex QP on the product of simplices; `solve_smoothed_simplex_qp` solves it exactly (primal active set, one
equality ``sum(lambda_b) = 1`` per bin). ``rho = 0`` gives the independent per-bin solves, ``rho -> inf`` a single
weight vector for all bins. Nothing here imports Diffusers.
"""

import math
import numbers
from typing import Tuple

import torch

from .fusion_utils import active_set_iterations, solve_simplex_qp


def smoothness_matrix(num_bins: int) -> torch.Tensor:
    """``D^T D`` for the first differences ``D`` between neighbouring bins: the path-graph Laplacian `(nb, nb)`."""
    difference = torch.zeros(max(num_bins - 1, 0), num_bins, dtype=torch.float64)
    index = torch.arange(num_bins - 1)
    difference[index, index], difference[index, index + 1] = -1.0, 1.0
    return difference.T @ difference


def tangent_curvature(gram: torch.Tensor) -> float:
    """The mean curvature of ``lambda^T G lambda`` along the simplex, ``trace(P G P) / (k - 1)`` with
    ``P = I - 11^T / k``: the loss scale that a change of the weights meets (0 for one member)."""
    k = gram.shape[-1]
    if k < 2:
        return 0.0
    projector = torch.eye(k, dtype=torch.float64) - 1.0 / k
    return float(torch.trace(projector @ gram.to(torch.float64) @ projector)) / (k - 1)


def _solve_on_faces(
    hessian: torch.Tensor, linear: torch.Tensor, groups: torch.Tensor, num_groups: int, free: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Minimiser on the affine hull of the face ``free``: ``H_FF x_F + A_F^T mu = b_F``, ``A_F x_F = 1``."""
    idx = free.nonzero().flatten()
    n = idx.numel()
    # the equality rows are scaled like the Hessian (then mu / scale is solved for): a large smoothness would
    # otherwise leave the system ill-conditioned enough for the constraints to be met only approximately
    scale = max(1.0, hessian.abs().max().item())
    kkt = hessian.new_zeros(n + num_groups, n + num_groups)
    kkt[:n, :n] = hessian[idx][:, idx]
    kkt[idx.new_tensor(range(n)), n + groups[idx]] = scale
    kkt[n + groups[idx], idx.new_tensor(range(n))] = scale
    rhs = torch.cat([linear[idx], linear.new_full((num_groups,), scale)])
    solution = torch.linalg.lstsq(kkt, rhs.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    residual = (kkt @ solution - rhs).abs().max()
    if residual > 1e-8 * max(scale, linear.abs().max().item()):
        raise ValueError("the quadratic is unbounded on a face: the Hessian must be PSD with linear in its range")
    solution[n:] *= scale
    weights = torch.zeros_like(linear)
    weights[idx] = solution[:n]
    return weights, solution[n:]


def solve_smoothed_simplex_qp(gram: torch.Tensor, linear: torch.Tensor, smoothness: float = 0.0) -> torch.Tensor:
    """Exact minimiser of ``sum_b (lambda_b^T G_b lambda_b - 2 b_b^T lambda_b) + rho sum_b ||lambda_{b+1} -
    lambda_b||^2`` with every ``lambda_b`` on the simplex.

    Args:
        gram (`torch.Tensor`): ``G_b``, `(nb, k, k)`, symmetric PSD (e.g. each bin's share of the data times its mean).
        linear (`torch.Tensor`): ``b_b``, `(nb, k)`.
        smoothness (`float`): ``rho >= 0``.

    Returns:
        `torch.Tensor`: the weights `(nb, k)`, float64; weights of inactive members are exactly 0.

    The primal active-set method of `solve_simplex_qp` (Nocedal & Wright, Alg. 16.3) with one equality per bin,
    started from the bins solved one by one by `solve_simplex_qp` (the answer when ``rho = 0``).
    """
    gram = torch.as_tensor(gram, dtype=torch.float64).cpu()
    linear = torch.as_tensor(linear, dtype=torch.float64).cpu()
    if gram.ndim != 3 or linear.ndim != 2 or gram.shape != (*linear.shape, linear.shape[1]) or linear.numel() == 0:
        raise ValueError(
            f"gram must be (nb, k, k) and linear (nb, k), got {tuple(gram.shape)} and {tuple(linear.shape)}"
        )
    if isinstance(smoothness, bool) or not isinstance(smoothness, numbers.Real) or not 0 <= smoothness < math.inf:
        raise ValueError(f"smoothness must be a finite number >= 0, got {smoothness!r}")
    if not (torch.isfinite(gram).all() and torch.isfinite(linear).all()):
        raise ValueError("gram and linear must be finite")
    num_bins, k = linear.shape
    independent = torch.stack([solve_simplex_qp(gram[b], linear[b]) for b in range(num_bins)])
    if smoothness == 0 or num_bins == 1:
        return independent
    hessian = torch.block_diag(*(0.5 * (g + g.T) for g in gram))
    hessian = hessian + float(smoothness) * torch.kron(smoothness_matrix(num_bins), torch.eye(k, dtype=torch.float64))
    flat_linear = linear.flatten()
    groups = torch.arange(num_bins).repeat_interleave(k)  # the bin of each variable
    tol = 1e-12 * max(1.0, hessian.abs().max().item(), flat_linear.abs().max().item())
    weights = independent.flatten()  # a feasible start, usually on a face close to the optimum's
    free = weights > 0

    def solve_face(face: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        target, mu = _solve_on_faces(hessian, flat_linear, groups, num_bins, face)
        return target, mu[groups]  # each variable's bin multiplier

    weights = active_set_iterations(
        solve_face, hessian, flat_linear, weights, free, tol, 100 * (num_bins * k + 1),
        normalise=lambda w: (w.reshape(num_bins, k) / w.reshape(num_bins, k).sum(1, keepdim=True)).flatten(),
    )  # fmt: skip
    return weights.reshape(num_bins, k)
