"""Learning the fusion weights from a few target samples by denoising score matching (Liu et al., AISTATS 2025).

The loss ``L(lambda) = E w(t) || sum_i lambda_i eps_i(x_t, t) - eps ||^2`` is the quadratic
``lambda^T G lambda - 2 b^T lambda + c``: one pass over the data accumulates ``G``, ``b``, ``c`` and the simplex QP is
solved exactly. ``method="sgd"`` is the paper's reference procedure (softmax logits, SGD with momentum).
"""

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from diffusers.utils import BaseOutput
from tqdm.auto import tqdm

from .fitting_utils import (
    check_images,
    check_options,
    member_inputs,
    noised_batches,
    provenance_record,
    reduce_sum,
    resolve_timestep_range,
    shared_seed,
)
from .fusion.fusion_utils import quadratic_loss, solve_simplex_qp
from .models.modeling_fused_unet import FusedUNet, check_scheduler_matches

METHODS = ("exact", "sgd")


@dataclass
class FitResult(BaseOutput):
    r"""
    Output of [`fit_weights`].

    Args:
        weights (`torch.Tensor`): the fitted weights, float64, shape `(k,)` or `(num_bins, k)`; on the simplex.
        loss (`float`): the score-matching loss at `weights` on the fitting data (the quadratic below).
        per_model_loss (`torch.Tensor`): the loss of each member alone (one-hot weights), shape `(k,)`.
        num_forward_passes (`int`): member forward calls (each member on each batch counts once).
        standard_errors (`torch.Tensor` or `None`): bootstrap standard error of each weight (shape of `weights`);
            `None` for `method="sgd"`, `num_bootstrap=0` or fewer than 2 samples.
        timestep_bin_edges (`list[float]` or `None`): bin edges when `num_timestep_bins > 1`.
        gram, linear, constant (`torch.Tensor`): the accumulated quadratic ``G``, ``b``, ``c`` (float64 means over
            noised samples), shapes `(k, k)`, `(k,)`, `()`, or with a leading `num_bins` dimension when binned.
        provenance (`dict`): how the weights were obtained (JSON-serialisable); saved with the fusion.
    """

    weights: torch.Tensor
    loss: float
    per_model_loss: torch.Tensor
    num_forward_passes: int
    standard_errors: Optional[torch.Tensor]
    timestep_bin_edges: Optional[List[float]]
    gram: torch.Tensor
    linear: torch.Tensor
    constant: torch.Tensor
    provenance: Dict[str, Any]


def _zero_sums(num_samples: int, num_bins: int, num_members: int) -> Dict[str, torch.Tensor]:
    shapes = dict(gram=(num_members, num_members), linear=(num_members,), constant=(), count=())
    return {name: torch.zeros((num_samples, num_bins) + shape, dtype=torch.float64) for name, shape in shapes.items()}


def _accumulate(sums: Dict[str, torch.Tensor], batch: Dict[str, torch.Tensor]) -> None:
    """Adds a batch's per-row terms to the per-(sample, bin) sums."""
    num_samples, num_bins = sums["count"].shape
    flat = batch["sample_index"] * num_bins + batch["bin"]  # (B,)
    for name in ("gram", "linear", "constant"):
        sums[name].view((num_samples * num_bins,) + sums[name].shape[2:]).index_add_(0, flat, batch[name])
    sums["count"].view(-1).index_add_(0, flat, torch.ones_like(batch["constant"]))


def _solve_bins(gram: torch.Tensor, linear: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Exact QP per bin from summed terms `(nb, k, k)`, `(nb, k)`, counts `(nb,)`; returns `(nb, k)`."""
    empty = (count == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"timestep bins {empty} received no noised samples; use fewer num_timestep_bins or more num_noise_draws"
        )
    return torch.stack([solve_simplex_qp(gram[i] / count[i], linear[i] / count[i]) for i in range(count.numel())])


def _bootstrap_standard_errors(sums: Dict[str, torch.Tensor], num_bootstrap: int, seed: int) -> Optional[torch.Tensor]:
    """Standard error of the exact weights under resampling target samples with replacement, `(nb, k)`."""
    num_samples = sums["count"].shape[0]
    if num_bootstrap == 0 or num_samples < 2:
        return None
    generator = torch.Generator().manual_seed(seed)
    replicates = []
    for _ in range(num_bootstrap):
        draw = torch.randint(num_samples, (num_samples,), generator=generator)
        multiplicity = torch.bincount(draw, minlength=num_samples).to(torch.float64)  # (N,)
        count = multiplicity @ sums["count"]  # (nb,)
        if (count == 0).any():  # a bin without data in this resample: the weights are undefined there
            continue
        gram = torch.einsum("n,nbij->bij", multiplicity, sums["gram"])
        linear = torch.einsum("n,nbi->bi", multiplicity, sums["linear"])
        replicates.append(_solve_bins(gram, linear, count))
    if len(replicates) < 2:
        return None
    return torch.stack(replicates).std(dim=0)


def _exact_pass(
    batches: Callable[[], Iterator[Dict[str, torch.Tensor]]],
    num_members: int,
    sums: Dict[str, torch.Tensor],
    progress: tqdm,
    accelerator: Optional[Any],
) -> int:
    """One pass over this process's samples into `sums`; returns the member forwards. Failures reach all processes."""
    num_forward_passes, seen, failure = 0, set(), None
    try:
        for batch in batches():
            num_forward_passes += num_members
            _accumulate(sums, batch)
            new = set(batch["sample_index"].tolist()) - seen
            seen |= new
            progress.update(len(new))
    except ValueError as error:  # e.g. NaN from a member: tell the other processes before raising, so none hangs
        failure = error
    failed_processes = int(reduce_sum(torch.tensor([float(failure is not None)]), accelerator).item())
    if failure is not None:
        raise failure
    if failed_processes:
        raise ValueError(f"{failed_processes} other process(es) failed during the pass; see their error")
    return num_forward_passes


def _sgd(
    batches: Callable[[], Iterator[Dict[str, torch.Tensor]]],
    num_members: int,
    sums: Dict[str, torch.Tensor],
    options: Dict[str, Any],
    progress: Optional[tqdm],
) -> Tuple[torch.Tensor, int]:
    """The paper's reference procedure: lambda = softmax(logits), minibatch SGD with momentum on the DSM loss.

    The minibatch loss ``|| sum_i lambda_i eps_i - eps ||^2`` equals the quadratic of the batch's ``G``, ``b``, ``c``,
    so its gradient is the one backpropagation through the combined prediction gives. Every epoch runs the members
    again on the same noised samples (the same finite-sample loss as the exact method); the first fills `sums`.
    """
    logits = torch.zeros(num_members, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([logits], lr=options["learning_rate"], momentum=options["momentum"])
    num_forward_passes = 0
    for epoch in range(options["num_epochs"]):
        for batch in batches():
            num_forward_passes += num_members
            if epoch == 0:
                _accumulate(sums, batch)
            loss = quadratic_loss(
                torch.softmax(logits, 0), batch["gram"].mean(0), batch["linear"].mean(0), batch["constant"].mean(0)
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if progress is not None:
            progress.update(1)
        if options["callback"] is not None:
            options["callback"](epoch, torch.softmax(logits, 0).detach(), num_forward_passes)
    return torch.softmax(logits, 0).detach().unsqueeze(0), num_forward_passes


def fit_weights(
    fused: FusedUNet,
    noise_scheduler: Any,
    latents: torch.Tensor,
    encoder_hidden_states: Optional[torch.Tensor] = None,
    *,
    unet_kwargs: Optional[Dict[str, Any]] = None,
    method: str = "exact",
    num_noise_draws: int = 8,
    timestep_range: Union[str, Tuple[int, int]] = "full",
    weighting: str = "uniform",
    snr_gamma: float = 5.0,
    num_timestep_bins: int = 1,
    batch_size: int = 16,
    generator: Optional[torch.Generator] = None,
    num_bootstrap: int = 200,
    set_weights: bool = True,
    accelerator: Optional[Any] = None,
    progress_bar: bool = True,
    num_epochs: int = 100,
    learning_rate: float = 0.1,
    momentum: float = 0.9,
    callback: Optional[Callable[[int, torch.Tensor, int], None]] = None,
) -> FitResult:
    r"""
    Fits the fusion weights to target samples by denoising score matching, exactly by default.

    For each target sample, `num_noise_draws` timesteps and noises are drawn, the k frozen members run once under
    `torch.no_grad()`, and ``G = E[w eps_i . eps_j]``, ``b = E[w eps_i . target]``, ``c = E[w |target|^2]`` are
    accumulated; ``min lambda^T G lambda - 2 b^T lambda`` over the simplex is then solved exactly (members can get
    weight exactly 0). The target is the noise (`"epsilon"`), the velocity (`"v_prediction"`) or the clean sample
    (`"sample"`), following `fused.config.prediction_type`.

    Args:
        fused ([`FusedUNet`]): the members; left unchanged unless `set_weights=True`.
        noise_scheduler (`SchedulerMixin`): the members' training noise schedule (its `alphas_cumprod`); its
            `prediction_type` and schedule must match `fused`.
        latents (`torch.Tensor`): the target samples in model space `(N, C, H, W)` (VAE latents times the scaling
            factor for Stable Diffusion, pixels in [-1, 1] for a pixel-space model), in `fused`'s dtype.
        encoder_hidden_states (`torch.Tensor`, *optional*): per-sample conditioning `(N, L, D)`; `None` for
            unconditional members.
        unet_kwargs (`dict`, *optional*): more member inputs (e.g. SDXL's `added_cond_kwargs`). Tensors (also inside
            nested dicts) whose first dimension is N are indexed with the samples; other values are passed as is.
        method (`str`): `"exact"` (one pass and the exact QP) or `"sgd"` (the paper's softmax-logit SGD).
        num_noise_draws (`int`): noise levels and noises drawn per target sample.
        timestep_range (`str` or `(int, int)`): `"full"` (the whole schedule, the paper's EMNIST setting),
            `"small_t"` (timesteps with ``sigma_t <= 0.1``: the barycenter of the clean distributions, the paper's 1-D
            setting) or inclusive integer bounds `(t_min, t_max)`.
        weighting (`str`): w(t): `"uniform"`, `"snr"` or `"min_snr"` (with `snr_gamma`).
        num_timestep_bins (`int`): > 1 fits one weight vector per equal-width timestep bin from the same pass.
        batch_size (`int`): noised samples per member forward.
        generator (`torch.Generator`, *optional*): makes the noise reproducible; each sample's draws come from a
            seed derived from it and the sample's index, so they do not depend on batching or process count.
        num_bootstrap (`int`): bootstrap replicates over target samples for the standard errors (0 disables).
        set_weights (`bool`): set the fitted weights (and their provenance) on `fused`.
        accelerator (`accelerate.Accelerator` or `PartialState`, *optional*): shard samples over processes; the sums
            are added across processes before the solve, so every process returns the same result.
        progress_bar (`bool`): show a tqdm progress bar (main process only).
        num_epochs, learning_rate, momentum (*optional*): `method="sgd"` only (paper: 100, 0.1, 0.9).
        callback (`Callable[[int, torch.Tensor, int], None]`, *optional*): `method="sgd"` only, called after each
            epoch with `(epoch, weights, num_forward_passes)`.

    Returns:
        [`FitResult`]: weights, loss, per-member losses, forward count, standard errors, the quadratic, provenance.
    """
    if not isinstance(fused, FusedUNet):
        raise TypeError(f"fused must be a FusedUNet, got {type(fused).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    alphas_cumprod = getattr(noise_scheduler, "alphas_cumprod", None)
    if not isinstance(alphas_cumprod, torch.Tensor) or not hasattr(noise_scheduler, "config"):
        raise TypeError(
            "noise_scheduler must be a Diffusers scheduler with alphas_cumprod (a DDPM-family scheduler), got "
            f"{type(noise_scheduler).__name__} {noise_scheduler!r:.80}"
        )
    if alphas_cumprod.numel() == 0 or not (torch.isfinite(alphas_cumprod).all() and (alphas_cumprod >= 0).all()
                                            and (alphas_cumprod <= 1).all()):  # fmt: skip
        raise ValueError(f"noise_scheduler.alphas_cumprod must be finite numbers in [0, 1], got {alphas_cumprod[:5]}...")
    check_scheduler_matches(fused, noise_scheduler)
    options = check_options(
        num_noise_draws=num_noise_draws, weighting=weighting, snr_gamma=snr_gamma, num_timestep_bins=num_timestep_bins,
        batch_size=batch_size, num_bootstrap=num_bootstrap, num_epochs=num_epochs, learning_rate=learning_rate,
        momentum=momentum, generator=generator, callback=callback, set_weights=set_weights,
    )  # fmt: skip
    if accelerator is not None and not all(hasattr(accelerator, name) for name in ("num_processes", "process_index")):
        raise TypeError(
            f"accelerator must be an accelerate.Accelerator or PartialState, got {type(accelerator).__name__}"
        )
    num_processes = 1 if accelerator is None else accelerator.num_processes
    if method == "sgd" and (num_timestep_bins > 1 or num_processes > 1):
        raise ValueError(
            f"method='sgd' fits one weight vector on one process; got num_timestep_bins={num_timestep_bins}, "
            f"{num_processes} processes (use method='exact')"
        )
    inputs = member_inputs(fused, latents, encoder_hidden_states, unet_kwargs)
    t_min, t_max = resolve_timestep_range(timestep_range, alphas_cumprod)
    if num_timestep_bins > t_max - t_min + 1:
        raise ValueError(
            f"num_timestep_bins={num_timestep_bins} exceeds the {t_max - t_min + 1} timesteps in [{t_min}, {t_max}]"
        )
    bin_edges = torch.linspace(t_min, t_max + 1, num_timestep_bins + 1, dtype=torch.float64)

    seed = shared_seed(generator, accelerator)
    num_samples, num_members = latents.shape[0], fused.config.num_members
    process_index = 0 if accelerator is None else accelerator.process_index
    indices = list(range(process_index, num_samples, num_processes))  # this process's shard
    is_main = accelerator is None or accelerator.is_main_process

    def batches() -> Iterator[Dict[str, torch.Tensor]]:
        return noised_batches(fused, alphas_cumprod, latents, inputs, indices, seed, (t_min, t_max), bin_edges,
                              options)  # fmt: skip

    sums = _zero_sums(num_samples, num_timestep_bins, num_members)
    total = options["num_epochs"] if method == "sgd" else len(indices)
    progress = tqdm(total=total, desc=f"fit_weights ({method})", disable=not (progress_bar and is_main))
    with progress:
        if method == "sgd":
            sgd_weights, num_forward_passes = _sgd(batches, num_members, sums, options, progress)
        else:
            sgd_weights, num_forward_passes = None, _exact_pass(batches, num_members, sums, progress, accelerator)
    sums = {name: reduce_sum(value, accelerator) for name, value in sums.items()}
    num_forward_passes = int(reduce_sum(torch.tensor([float(num_forward_passes)]), accelerator).item())
    range_name = timestep_range if isinstance(timestep_range, str) else None
    info = dict(method=method, timestep_range=[t_min, t_max], timestep_range_name=range_name,
                num_processes=num_processes, latents=latents, member_inputs=inputs, **options)  # fmt: skip
    return _finish(fused, sums, sgd_weights, num_forward_passes, bin_edges, seed, info)


def _finish(
    fused: FusedUNet,
    sums: Dict[str, torch.Tensor],
    sgd_weights: Optional[torch.Tensor],
    num_forward_passes: int,
    bin_edges: torch.Tensor,
    seed: int,
    info: Dict[str, Any],
) -> FitResult:
    """Solves (unless SGD gave the weights), evaluates, bootstraps, records provenance and sets the weights."""
    gram, linear = sums["gram"].sum(0), sums["linear"].sum(0)  # (nb, k, k), (nb, k)
    constant, count = sums["constant"].sum(0), sums["count"].sum(0)  # (nb,), (nb,)
    weights = _solve_bins(gram, linear, count) if sgd_weights is None else sgd_weights  # (nb, k)
    total = count.sum()
    loss = sum(quadratic_loss(weights[i], gram[i], linear[i], constant[i]) for i in range(count.numel())) / total
    # one member alone: lambda = e_i  =>  G_ii - 2 b_i + c, over all bins
    per_model_loss = (gram.sum(0).diagonal() - 2 * linear.sum(0) + constant.sum()) / total
    standard_errors = None
    if info["method"] == "exact":
        standard_errors = _bootstrap_standard_errors(sums, info["num_bootstrap"], seed + 1)
    binned = count.numel() > 1
    squeeze = (lambda x: x) if binned else (lambda x: None if x is None else x[0])  # noqa: E731
    edges = bin_edges.tolist() if binned else None
    result_weights, result_errors = squeeze(weights), squeeze(standard_errors)
    provenance = provenance_record(info, float(loss), per_model_loss, result_errors, num_forward_passes, seed, edges)
    result = FitResult(
        weights=result_weights, loss=float(loss), per_model_loss=per_model_loss, num_forward_passes=num_forward_passes,
        standard_errors=result_errors, timestep_bin_edges=edges, gram=squeeze(gram / count[:, None, None]),
        linear=squeeze(linear / count[:, None]), constant=squeeze(constant / count), provenance=provenance,
    )  # fmt: skip
    if info["set_weights"]:
        fused.set_weights(result_weights, timestep_bin_edges=edges, provenance=provenance)
    return result


def encode_images(
    pipe: Any,
    images: Any,
    prompts: Union[str, Sequence[str]],
    height: Optional[int] = None,
    width: Optional[int] = None,
    batch_size: int = 8,
) -> Tuple[torch.Tensor, List[str]]:
    r"""
    VAE latents of target images and one caption per image, for fitting through a pipeline.

    Images are PIL images (converted to RGB as PIL does), or numpy arrays `(H, W, 3)` / tensors `(3, H, W)` (or
    batches of them) of uint8 pixels in 0..255 or floats in [0, 1] (or [-1, 1]); anything else is refused (see
    `fitting_utils.check_images`). Their size, or `height` and `width` (which resize), must be multiples of the VAE
    factor. They go through the pipeline's `VaeImageProcessor`; latents are the mean of the VAE posterior (deterministic: the same images always give the
    same latents and data fingerprint), shifted by `vae.config.shift_factor` when set and times
    `vae.config.scaling_factor`, in the UNet's dtype. The VAE runs in float32 when `vae.config.force_upcast` (the SDXL
    VAE overflows in float16).

    Returns:
        `(latents, prompts)`: `(N, C, h, w)` and a list of N strings.
    """
    images = check_images(images, height, width, pipe.image_processor.config.vae_scale_factor)
    pixels = pipe.image_processor.preprocess(images, height=height, width=width)  # (N, 3, H, W) in [-1, 1]
    num_images = pixels.shape[0]
    if num_images == 0:
        raise ValueError("images is empty: fitting needs at least one target image")
    if isinstance(prompts, str):
        prompts = [prompts] * num_images
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(prompt, str) for prompt in prompts):
        raise TypeError(f"prompts must be a string or a list of strings, got {prompts!r:.200}")
    if len(prompts) != num_images:
        raise ValueError(f"got {num_images} images but {len(prompts)} prompts; give one prompt per image or one string")
    if not torch.isfinite(pixels).all():
        raise ValueError("images contain NaN or inf")
    device, vae = pipe._execution_device, pipe.vae
    vae_dtype, shift = vae.dtype, getattr(vae.config, "shift_factor", None) or 0.0
    upcast = getattr(vae.config, "force_upcast", False) and vae_dtype != torch.float32
    latents = []
    try:
        if upcast:
            vae.to(torch.float32)
        with torch.no_grad():
            for start in range(0, num_images, batch_size):
                chunk = pixels[start : start + batch_size].to(device=device, dtype=vae.dtype)
                latents.append((vae.encode(chunk).latent_dist.mean - shift) * vae.config.scaling_factor)
    finally:
        if upcast:
            vae.to(vae_dtype)
    return torch.cat(latents).to(pipe.unet.dtype), list(prompts)


def encode_for_fitting(
    pipe: Any,
    images: Any,
    prompts: Union[str, Sequence[str]],
    height: Optional[int] = None,
    width: Optional[int] = None,
    batch_size: int = 8,
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""
    Encodes target images and captions with a Stable Diffusion pipeline's VAE and text encoder ([`encode_images`];
    prompts without classifier-free guidance).

    Returns:
        `(latents, prompt_embeds)`: `(N, C, h, w)` and `(N, L, D)`.
    """
    latents, prompts = encode_images(pipe, images, prompts, height=height, width=width, batch_size=batch_size)
    with torch.no_grad():
        prompt_embeds, _ = pipe.encode_prompt(prompts, pipe._execution_device, 1, False)
    return latents, prompt_embeds.to(pipe.unet.dtype)
