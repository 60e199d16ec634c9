"""The fusion maths: prediction-type conversions, combining, weight validation, the exact simplex QP."""

import itertools
import math

import pytest
import torch

from diffusers_scorefusion.fusion.fusion_utils import (
    PREDICTION_TYPES,
    alpha_sigma,
    check_bin_edges,
    check_weights,
    combine_predictions,
    convert_prediction,
    loss_weighting,
    quadratic_loss,
    score_matching_statistics,
    solve_simplex_qp,
    timestep_bins,
)


def _noised(batch_size: int = 3, seed: int = 0):
    """x0, eps, alpha, sigma and x_t = alpha x0 + sigma eps in float64, one noise level per sample."""
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch_size, 4, 5, 5, generator=generator, dtype=torch.float64)
    eps = torch.randn(batch_size, 4, 5, 5, generator=generator, dtype=torch.float64)
    alphas_cumprod = torch.tensor([0.999, 0.7, 0.05], dtype=torch.float64)[:batch_size]
    alpha, sigma = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
    x_t = alpha.view(-1, 1, 1, 1) * x0 + sigma.view(-1, 1, 1, 1) * eps
    return x0, eps, alpha, sigma, x_t


# ------------------------------------------------------------------------------------------------ convert_prediction
def test_convert_prediction_matches_the_definitions():
    x0, eps, alpha, sigma, x_t = _noised()
    v = alpha.view(-1, 1, 1, 1) * eps - sigma.view(-1, 1, 1, 1) * x0
    truth = {"epsilon": eps, "v_prediction": v, "sample": x0}
    for from_type, to_type in itertools.product(PREDICTION_TYPES, PREDICTION_TYPES):
        converted = convert_prediction(truth[from_type], x_t, alpha, sigma, from_type, to_type)
        torch.testing.assert_close(converted, truth[to_type], rtol=0, atol=1e-12, msg=f"{from_type} -> {to_type}")


def test_convert_prediction_closed_forms_from_diffusers_notes():
    # eps = sqrt(a) v + sqrt(1 - a) x_t ;  eps = (x_t - sqrt(a) x0) / sqrt(1 - a)
    generator = torch.Generator().manual_seed(1)
    x_t, output = torch.randn(2, 2, 3, 3, generator=generator), torch.randn(2, 2, 3, 3, generator=generator)
    a = torch.tensor([0.9, 0.2], dtype=torch.float64)
    alpha, sigma = a.sqrt(), (1 - a).sqrt()
    a4 = a.view(-1, 1, 1, 1)
    eps_from_v = convert_prediction(output, x_t, alpha, sigma, "v_prediction", "epsilon")
    eps_from_x0 = convert_prediction(output, x_t, alpha, sigma, "sample", "epsilon")
    assert eps_from_v.dtype == torch.float32
    torch.testing.assert_close(eps_from_v, (a4.sqrt() * output + (1 - a4).sqrt() * x_t).float())
    torch.testing.assert_close(eps_from_x0, ((x_t - a4.sqrt() * output) / (1 - a4).sqrt()).float())


@pytest.mark.parametrize("from_type,to_type", [p for p in itertools.permutations(PREDICTION_TYPES, 2)])
def test_convert_prediction_round_trip(from_type, to_type):
    _, _, alpha, sigma, x_t = _noised()
    output = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    there = convert_prediction(output, x_t, alpha, sigma, from_type, to_type)
    back = convert_prediction(there, x_t, alpha, sigma, to_type, from_type)
    assert not torch.allclose(there, output)
    torch.testing.assert_close(back, output, rtol=0, atol=1e-10)


def test_convert_prediction_same_type_is_identity_and_scalar_alpha_broadcasts():
    _, _, _, _, x_t = _noised()
    output = x_t.float() * 0.5
    assert convert_prediction(output, x_t, torch.tensor(0.8), torch.tensor(0.6), "epsilon", "epsilon") is output
    scalar = convert_prediction(output, x_t.float(), torch.tensor(0.8), torch.tensor(0.6), "sample", "epsilon")
    torch.testing.assert_close(scalar, (x_t.float() - 0.8 * output) / 0.6)


def test_convert_prediction_rejects_unknown_types():
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="got 'eps'"):
        convert_prediction(x, x, torch.tensor(1.0), torch.tensor(0.0), "eps", "epsilon")
    with pytest.raises(ValueError, match="got 'flow'"):
        convert_prediction(x, x, torch.tensor(1.0), torch.tensor(0.0), "epsilon", "flow")


def test_alpha_sigma_integer_timesteps_match_alphas_cumprod():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    timesteps = torch.tensor([0, 1, 250, 999])
    alpha, sigma = alpha_sigma(alphas_cumprod, timesteps)
    torch.testing.assert_close(alpha, alphas_cumprod[timesteps].sqrt(), rtol=0, atol=1e-12)
    torch.testing.assert_close(sigma, (1 - alphas_cumprod[timesteps]).sqrt(), rtol=0, atol=1e-12)
    # a fractional timestep lies between its neighbours (log sigma interpolated, as Euler does)
    alpha_half, sigma_half = alpha_sigma(alphas_cumprod, torch.tensor([250.5]))
    assert alpha[2] > alpha_half[0] > alphas_cumprod[251].sqrt()
    torch.testing.assert_close(alpha_half**2 + sigma_half**2, torch.ones(1, dtype=torch.float64))


def test_alpha_sigma_zero_terminal_snr_is_finite():
    # rescale_betas_zero_snr=True gives alphas_cumprod[-1] == 0: alpha = 0, sigma = 1 there, not NaN (0 * inf)
    alphas_cumprod = torch.tensor([0.99, 0.5, 0.0], dtype=torch.float64)
    alpha, sigma = alpha_sigma(alphas_cumprod, torch.tensor([0, 1, 2]))
    assert alpha.tolist() == pytest.approx([0.99**0.5, 0.5**0.5, 0.0], abs=1e-12)
    assert sigma.tolist() == pytest.approx([0.01**0.5, 0.5**0.5, 1.0], abs=1e-12)
    x_t, v = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    eps = convert_prediction(v, x_t, alpha, sigma, "v_prediction", "epsilon")
    torch.testing.assert_close(eps[2], x_t[2])  # eps = sqrt(a) v + sqrt(1 - a) x_t with a = 0


def test_min_snr_weighting_at_zero_terminal_snr():
    # min(SNR, gamma) / SNR = min(1, gamma / SNR): 1 where SNR <= gamma, including SNR = 0 (not 0 / 0)
    alphas_cumprod = torch.tensor([0.99, 0.5, 0.0], dtype=torch.float64)
    weights = loss_weighting(torch.tensor([0, 1, 2]), alphas_cumprod, "min_snr", snr_gamma=5.0)
    assert weights.tolist() == pytest.approx([5.0 / 99.0, 1.0, 1.0], abs=1e-12)


# ------------------------------------------------------------------------------------------------ combine_predictions
def test_combine_predictions_is_the_weighted_sum():
    generator = torch.Generator().manual_seed(0)
    predictions = [torch.randn(2, 4, 3, 3, generator=generator) for _ in range(3)]
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    expected = sum(w * p.double() for w, p in zip(weights, predictions)).float()
    fused = combine_predictions(predictions, weights)
    assert fused.dtype == torch.float32 and fused.shape == (2, 4, 3, 3)
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-6)


def test_combine_predictions_one_hot_is_exact_and_per_sample_weights():
    generator = torch.Generator().manual_seed(0)
    predictions = [torch.randn(2, 4, 3, 3, generator=generator) for _ in range(3)]
    assert torch.equal(
        combine_predictions(predictions, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)), predictions[1]
    )
    per_sample = torch.tensor([[1.0, 0.0, 0.0], [0.25, 0.25, 0.5]], dtype=torch.float64)  # (B, k)
    fused = combine_predictions(predictions, per_sample)
    assert torch.equal(fused[0], predictions[0][0])
    torch.testing.assert_close(fused[1], 0.25 * predictions[0][1] + 0.25 * predictions[1][1] + 0.5 * predictions[2][1])


def test_combine_predictions_half_precision_keeps_dtype():
    predictions = [torch.full((1, 2), 1.0, dtype=torch.float16), torch.full((1, 2), 3.0, dtype=torch.float16)]
    fused = combine_predictions(predictions, torch.tensor([0.25, 0.75]))
    assert fused.dtype == torch.float16
    assert torch.equal(fused, torch.full((1, 2), 2.5, dtype=torch.float16))


def test_combine_predictions_rejects_count_mismatch():
    with pytest.raises(ValueError, match="got 2 predictions for weights of shape \\(3,\\)"):
        combine_predictions([torch.zeros(1), torch.zeros(1)], torch.tensor([0.2, 0.3, 0.5]))
    with pytest.raises(ValueError, match="got 0 predictions"):
        combine_predictions([], torch.tensor([1.0]))


# ------------------------------------------------------------------------------------------------ check_weights
def test_check_weights_accepts_simplex_and_returns_table():
    table = check_weights([0.2, 0.3, 0.5], 3)
    assert table.dtype == torch.float64 and table.shape == (1, 3)
    assert table.tolist() == [[0.2, 0.3, 0.5]]
    assert check_weights(torch.tensor([[1.0, 0.0], [0.5, 0.5]]), 2).shape == (2, 2)
    check_weights([0.5, 0.5 + 0.9e-6], 2)  # inside the 1e-6 tolerance


@pytest.mark.parametrize(
    "weights,num_members,match",
    [
        ([0.5, 0.6], 2, r"must sum to 1 .*got 1\.10000000 in row 0: \[0\.5, 0\.6\]"),
        ([0.5, 0.5 + 2e-6], 2, r"must sum to 1 .*got 1\.00000200"),
        ([0.25, 0.25], 2, r"must sum to 1 .*got 0\.50000000"),
        ([[1.0, 0.0], [0.3, 0.3]], 2, r"got 0\.60000000 in row 1: \[0\.3, 0\.3\]"),
        ([1.5, -0.5], 2, r"must be >= 0, got \[\[1\.5, -0\.5\]\]"),
        ([float("nan"), 1.0], 2, r"must be finite, got \[\[nan, 1\.0\]\]"),
        ([float("inf"), 0.0], 2, r"must be finite, got \[\[inf, 0\.0\]\]"),
        ([0.5, 0.5], 3, r"must have 3 entries per row \(one per member\), got 2: \[\[0\.5, 0\.5\]\]"),
        ([[[1.0]]], 1, r"shape \(k,\) or \(num_bins, k\), got shape \(1, 1, 1\)"),
        ([], 1, r"must have 1 entries per row .*got 0"),
    ],
)
def test_check_weights_errors_show_the_value(weights, num_members, match):
    with pytest.raises(ValueError, match=match):
        check_weights(weights, num_members)


def test_check_weights_does_not_renormalise_and_names_the_argument():
    weights = [0.4, 0.4]
    with pytest.raises(ValueError, match=r"^fusion_weights must sum to 1"):
        check_weights(weights, 2, name="fusion_weights")
    assert weights == [0.4, 0.4]
    with pytest.raises(TypeError, match="list or tensor of numbers, got 'abc'"):
        check_weights("abc", 3)


def test_bin_edges_and_timestep_bins():
    edges = check_bin_edges([0, 300, 700, 1000], 3)
    timesteps = torch.tensor([0, 299, 300, 699.5, 700, 999, 1000, -5, 5000])
    assert timestep_bins(timesteps, edges).tolist() == [0, 0, 1, 1, 2, 2, 2, 0, 2]
    with pytest.raises(ValueError, match=r"num_bins \+ 1 = 3 numbers, got \[0\.0, 1000\.0\]"):
        check_bin_edges([0, 1000], 2)
    with pytest.raises(ValueError, match=r"strictly increasing, got \[0\.0, 500\.0, 500\.0\]"):
        check_bin_edges([0, 500, 500], 2)


# ------------------------------------------------------------------------------------------------ score matching
def test_quadratic_equals_the_score_matching_loss():
    generator = torch.Generator().manual_seed(0)
    member_outputs = torch.randn(3, 5, 2, 4, 4, generator=generator)  # (k, B, C, H, W)
    target = torch.randn(5, 2, 4, 4, generator=generator)
    loss_weights = torch.rand(5, generator=generator, dtype=torch.float64)
    gram, linear, constant = score_matching_statistics(member_outputs, target, loss_weights)
    weights = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64)
    fused = torch.einsum("k,kbchw->bchw", weights, member_outputs.double())
    direct = (loss_weights * ((fused - target.double()) ** 2).flatten(1).mean(1)).mean()
    quadratic = quadratic_loss(weights, gram.mean(0), linear.mean(0), constant.mean(0))
    torch.testing.assert_close(quadratic, direct, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------ solve_simplex_qp
def _brute_force_simplex_qp(gram: torch.Tensor, linear: torch.Tensor) -> torch.Tensor:
    """The exact minimum by enumerating every face: solve the KKT system on it, keep feasible points, take the best."""
    k = linear.numel()
    best, best_value = None, math.inf
    for size in range(1, k + 1):
        for face in itertools.combinations(range(k), size):
            idx = list(face)
            kkt = torch.zeros(size + 1, size + 1, dtype=torch.float64)
            kkt[:size, :size] = gram[idx][:, idx]
            kkt[:size, size] = 1
            kkt[size, :size] = 1
            rhs = torch.cat([linear[idx], torch.ones(1, dtype=torch.float64)])
            solution = torch.linalg.lstsq(kkt, rhs.unsqueeze(1), driver="gelsd").solution.squeeze(1)
            if (kkt @ solution - rhs).abs().max() > 1e-9 or (solution[:size] < -1e-12).any():
                continue
            weights = torch.zeros(k, dtype=torch.float64)
            weights[idx] = solution[:size].clamp(min=0)
            value = (weights @ gram @ weights - 2 * linear @ weights).item()
            if value < best_value:
                best, best_value = weights, value
    return best


def _grid_minimum(gram: torch.Tensor, linear: torch.Tensor, steps: int = 200) -> float:
    """min of the quadratic on a grid of the 3-simplex (k = 3)."""
    grid = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    l1, l2 = torch.meshgrid(grid, grid, indexing="ij")
    mask = l1 + l2 <= 1 + 1e-12
    points = torch.stack([l1[mask], l2[mask], (1 - l1[mask] - l2[mask]).clamp(min=0)], dim=1)  # (N, 3)
    values = torch.einsum("ni,ij,nj->n", points, gram, points) - 2 * points @ linear
    return values.min().item()


def _objective(weights, gram, linear):
    return (weights @ gram @ weights - 2 * linear @ weights).item()


@pytest.mark.parametrize("seed", range(12))
def test_solve_simplex_qp_matches_enumeration_on_random_psd_problems(seed):
    generator = torch.Generator().manual_seed(seed)
    k = 2 + seed % 4
    rank = k if seed % 3 else max(1, k - 2)  # every third problem is singular
    factor = torch.randn(rank, k, generator=generator, dtype=torch.float64)
    gram = factor.T @ factor
    # b in the range of G keeps the quadratic bounded on every face even when G is singular
    linear = gram @ torch.randn(k, generator=generator, dtype=torch.float64) * 2
    weights = solve_simplex_qp(gram, linear)
    assert weights.min() >= 0 and abs(weights.sum().item() - 1) < 1e-12
    expected = _brute_force_simplex_qp(gram, linear)
    assert _objective(weights, gram, linear) <= _objective(expected, gram, linear) + 1e-10
    if rank == k:  # strictly convex: the minimiser is unique
        torch.testing.assert_close(weights, expected, rtol=0, atol=1e-8)


def test_solve_simplex_qp_interior_solution_against_grid():
    # lambda* = (0.2, 0.5, 0.3) minimises ||sum lambda_i e_i - target||^2 with target = sum lambda*_i e_i
    generator = torch.Generator().manual_seed(0)
    outputs = torch.randn(3, 50, generator=generator, dtype=torch.float64)
    truth = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    gram, linear = outputs @ outputs.T, outputs @ (truth @ outputs)
    weights = solve_simplex_qp(gram, linear)
    torch.testing.assert_close(weights, truth, rtol=0, atol=1e-10)
    assert _objective(weights, gram, linear) <= _grid_minimum(gram, linear) + 1e-12


def test_solve_simplex_qp_solution_on_a_face_has_exact_zeros():
    # the target is a mix of members 0 and 2 pushed away from member 1: member 1 gets weight exactly 0
    generator = torch.Generator().manual_seed(3)
    outputs = torch.randn(3, 40, generator=generator, dtype=torch.float64)
    target = 0.6 * outputs[0] + 0.4 * outputs[2] - 0.5 * outputs[1]
    gram, linear = outputs @ outputs.T, outputs @ target
    weights = solve_simplex_qp(gram, linear)
    assert weights[1].item() == 0.0
    torch.testing.assert_close(weights, _brute_force_simplex_qp(gram, linear), rtol=0, atol=1e-10)
    assert _objective(weights, gram, linear) <= _grid_minimum(gram, linear) + 1e-12


def test_solve_simplex_qp_vertex_solution():
    gram = torch.eye(3, dtype=torch.float64)
    linear = torch.tensor([0.0, 5.0, 0.0], dtype=torch.float64)
    assert solve_simplex_qp(gram, linear).tolist() == [0.0, 1.0, 0.0]


def test_solve_simplex_qp_identical_members_singular_gram():
    # two identical members: G singular; any split between them is optimal, the objective must still be minimal
    generator = torch.Generator().manual_seed(4)
    base = torch.randn(2, 30, generator=generator, dtype=torch.float64)
    outputs = torch.stack([base[0], base[0], base[1]])  # members 0 and 1 identical
    target = 0.7 * base[0] + 0.3 * base[1]
    gram, linear = outputs @ outputs.T, outputs @ target
    assert torch.linalg.matrix_rank(gram) == 2
    weights = solve_simplex_qp(gram, linear)
    assert weights.min() >= 0 and abs(weights.sum().item() - 1) < 1e-12
    torch.testing.assert_close(weights[0] + weights[1], torch.tensor(0.7, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(weights[2], torch.tensor(0.3, dtype=torch.float64), rtol=0, atol=1e-10)
    # all identical: G = c 11^T; every point of the simplex is optimal
    same = torch.ones(3, 3, dtype=torch.float64)
    weights = solve_simplex_qp(same, torch.ones(3, dtype=torch.float64))
    assert weights.min() >= 0 and abs(weights.sum().item() - 1) < 1e-12


def test_solve_simplex_qp_single_member_and_errors():
    assert solve_simplex_qp(torch.tensor([[2.0]]), torch.tensor([7.0])).tolist() == [1.0]
    with pytest.raises(ValueError, match=r"got \(2, 3\) and \(2,\)"):
        solve_simplex_qp(torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="must be finite"):
        solve_simplex_qp(torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]), torch.zeros(2))
