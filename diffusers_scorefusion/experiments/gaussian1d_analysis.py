"""What the fused sampler samples in 1-D, and what the Langevin corrector changes: exact answers beside the samplers.

`what_is_sampled`: for a grid of weights ``lambda = (a, 1 - a)``, W1 to the target of (a) the clean barycenter
``p_1^a p_2^(1-a)`` computed on a grid, (b) the fused DDIM sampler with the auxiliaries' exact scores and (c) the
fused sampler with the trained auxiliaries. All three live in the target's model coordinates and are mapped back to
the data's units with the target's coordinates.

`corrector_study`: the fused sampler with ``M`` Langevin corrector steps per noise level, at the fitted weights: W1
to the exact clean barycenter and to the target, and its cost in member forwards; plus a control with a known answer
(two unimodal Gaussians with unequal variances, whose barycenter is Gaussian).
"""

from typing import Any, Callable, Dict, List, Sequence

import numpy as np
import torch
from scipy.stats import norm
from tqdm.auto import tqdm

from ..models.modeling_fused_unet import FusedUNet
from .mixtures1d import (
    ExactMixtureDenoiser,
    Mixture1D,
    barycenter_on_grid,
    grid_cdf,
    sample_from_grid,
    wasserstein1_between_cdfs,
    wasserstein1_to_cdf,
)
from .training import make_noise_scheduler

GRID = np.linspace(-8.0, 8.0, 32001)  # model space: the standardised / rescaled data live well inside it
CONTROL = (Mixture1D(means=(-1.0,), std=0.3, weights=(1.0,)), Mixture1D(means=(1.0,), std=1.0, weights=(1.0,)))
CONTROL_WEIGHTS = (0.5, 0.5)


def _exact_fusion(mixtures: Sequence[Mixture1D], weights: Sequence[float]) -> FusedUNet:
    alphas_cumprod = make_noise_scheduler().alphas_cumprod
    return FusedUNet([ExactMixtureDenoiser.from_mixture(m, alphas_cumprod) for m in mixtures], weights=list(weights))


def _model_space_mixtures(auxiliaries: Sequence[Dict[str, Any]]) -> List[Mixture1D]:
    """Each auxiliary's law in its own model coordinates: what its (exact) score describes, whatever it is fused in."""
    return [aux["mixture"].affine(aux["coordinates"].shift, aux["coordinates"].scale) for aux in auxiliaries]


def _barycenter_cdf(mixtures: Sequence[Mixture1D], a: float) -> np.ndarray:
    log_densities = np.stack([m.log_density(GRID) for m in mixtures])  # (2, G)
    return grid_cdf(GRID, barycenter_on_grid(log_densities, [a, 1 - a], GRID))


def what_is_sampled(settings: Any, target: Mixture1D, auxiliaries: Sequence[Dict[str, Any]], coords: Any, at: float,
                    sample_model: Callable[..., np.ndarray]) -> Dict[str, Any]:  # fmt: skip
    """W1 to the target against ``a = lambda(aux1)``: clean barycenter, exact-score sampler, trained sampler; and
    the three densities (histograms for the samplers) at ``a = at``, in the data's units."""
    mixtures = _model_space_mixtures(auxiliaries)
    data_grid = coords.to_data(GRID)
    target_cdf = target.cdf(data_grid)
    members = [aux["model"] for aux in auxiliaries]
    result: Dict[str, List[float]] = dict(lambdas=[], barycenter_w1=[], exact_sampler_w1=[], trained_sampler_w1=[])
    for a in tqdm(np.linspace(0.0, 1.0, settings.lambda_grid), desc="what is sampled", leave=False):
        weights = [float(a), float(1 - a)]
        result["lambdas"].append(float(a))
        result["barycenter_w1"].append(wasserstein1_between_cdfs(data_grid, _barycenter_cdf(mixtures, a), target_cdf))
        for key, fused in (("exact_sampler_w1", _exact_fusion(mixtures, weights)),
                           ("trained_sampler_w1", FusedUNet(members, weights=weights))):  # fmt: skip
            z = sample_model(fused, settings, noise_seed=777)
            result[key].append(wasserstein1_to_cdf(coords.to_data(z), data_grid, target_cdf))
    for key in ("barycenter_w1", "exact_sampler_w1", "trained_sampler_w1"):
        best = int(np.argmin(result[key]))
        result[f"{key}_min"] = dict(w1=result[key][best], a=result["lambdas"][best])
    edges = np.linspace(-15.0, 15.0, 241)
    centers = 0.5 * (edges[1:] + edges[:-1])
    barycenter = barycenter_on_grid(np.stack([m.log_density(GRID) for m in mixtures]), [at, 1 - at], GRID)
    densities = dict(a=at, x=centers.tolist(), target=target.density(centers).tolist(),
                     barycenter=(np.interp(centers, data_grid, barycenter) / coords.scale).tolist())  # fmt: skip
    for key, fused in (("exact_sampler", _exact_fusion(mixtures, [at, 1 - at])),
                       ("trained_sampler", FusedUNet(members, weights=[at, 1 - at]))):  # fmt: skip
        x = coords.to_data(sample_model(fused, settings, noise_seed=778))
        densities[key] = np.histogram(x, bins=edges, density=False)[0].astype(float) / (x.size * np.diff(edges)[0])
        densities[key] = densities[key].tolist()
    result["densities"] = densities
    return result


def _share_above(samples: np.ndarray, threshold: float) -> float:
    return float((np.asarray(samples) > threshold).mean())


def corrector_study(settings: Any, target: Mixture1D, auxiliaries: Sequence[Dict[str, Any]], coords: Any,
                    a: float, sample_model: Callable[..., np.ndarray]) -> Dict[str, Any]:  # fmt: skip
    """The corrected fused sampler at ``lambda = (a, 1 - a)``: W1 to the clean barycenter and to the target vs M."""
    mixtures = _model_space_mixtures(auxiliaries)
    data_grid = coords.to_data(GRID)
    barycenter = _barycenter_cdf(mixtures, a)
    target_cdf = target.cdf(data_grid)
    midpoint = float(np.mean(target.means))  # between the target's two modes: the share above it is the right mode's
    floor_draws = coords.to_data(sample_from_grid(GRID, barycenter, settings.num_generated, np.random.default_rng(5)))
    steps = settings.sampling_steps
    result: Dict[str, Any] = dict(
        a=a, midpoint=midpoint, num_members=len(mixtures), sampling_steps=steps,
        barycenter_floor_w1=wasserstein1_to_cdf(floor_draws, data_grid, barycenter),
        barycenter_right_share=float(1 - np.interp(midpoint, data_grid, barycenter)),
        target_right_share=float(1 - target.cdf(np.array(midpoint))),
        rows=[],
    )  # fmt: skip
    cases = [("exact", _exact_fusion(mixtures, [a, 1 - a]), settings.corrector_steps),
             ("trained", FusedUNet([aux["model"] for aux in auxiliaries], weights=[a, 1 - a]),
              settings.trained_corrector_steps)]  # fmt: skip
    progress = tqdm(total=sum(len(c[2]) for c in cases) + len(settings.corrector_steps), desc="corrector", leave=False)
    for name, fused, step_counts in cases:
        for m in step_counts:
            x = coords.to_data(sample_model(fused, settings, noise_seed=424_242, num_corrector_steps=m,
                                            generator=torch.Generator().manual_seed(1_000 + m)))  # fmt: skip
            forwards = len(mixtures) * (steps + (steps - 1) * m)  # predictor steps + corrector steps, per member
            result["rows"].append(dict(case=name, corrector_steps=m, member_forwards=forwards,
                                       w1_to_barycenter=wasserstein1_to_cdf(x, data_grid, barycenter),
                                       w1_to_target=wasserstein1_to_cdf(x, data_grid, target_cdf),
                                       right_share=_share_above(x, midpoint)))  # fmt: skip
            progress.update(1)
    result["control"] = control_study(settings, sample_model, progress)
    progress.close()
    return result


def control_study(settings: Any, sample_model: Callable[..., np.ndarray], progress: Any = None) -> Dict[str, Any]:
    """Unimodal members N(-1, 0.3^2), N(1, 1) at lambda = (0.5, 0.5) in model space: the barycenter is the Gaussian
    with precision ``sum_i lambda_i / s_i^2`` and precision-weighted mean, known exactly."""
    precision = sum(w / m.std**2 for w, m in zip(CONTROL_WEIGHTS, CONTROL))
    mean = sum(w * m.means[0] / m.std**2 for w, m in zip(CONTROL_WEIGHTS, CONTROL)) / precision
    std = float(np.sqrt(1 / precision))
    cdf = norm.cdf(GRID, loc=mean, scale=std)
    floor = wasserstein1_to_cdf(np.random.default_rng(6).normal(mean, std, settings.num_generated), GRID, cdf)
    fused = _exact_fusion(CONTROL, CONTROL_WEIGHTS)
    rows = []
    for m in settings.corrector_steps:
        z = sample_model(fused, settings, noise_seed=515, num_corrector_steps=m,
                         generator=torch.Generator().manual_seed(2_000 + m))  # fmt: skip
        rows.append(dict(corrector_steps=m, w1_to_barycenter=wasserstein1_to_cdf(z, GRID, cdf), mean=float(z.mean()),
                         std=float(z.std())))  # fmt: skip
        if progress is not None:
            progress.update(1)
    return dict(mean=float(mean), std=std, floor_w1=floor, rows=rows)
