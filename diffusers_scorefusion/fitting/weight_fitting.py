"""Learning the fusion weights from a few target samples by denoising score matching (Liu et al., AISTATS 2025).

The loss ``L(lambda) = E w(t) || sum_i lambda_i eps_i(x_t, t) - eps ||^2`` is the quadratic
``lambda^T G lambda - 2 b^T lambda + c``: one pass over the data accumulates ``G``, ``b``, ``c`` and the simplex QP is
solved exactly. ``method="sgd"`` is the paper's reference procedure (softmax logits, SGD with momentum).
Flow-matching members (`FusedTransformer`) minimise the same quadratic with velocities and the target ``eps - x0``.
"""

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from diffusers.utils import BaseOutput
from tqdm.auto import tqdm

from ..fusion.fusion_utils import quadratic_loss, solve_simplex_qp
from ..models.modeling_fused_transformer import FusedTransformer
from ..models.modeling_fused_unet import FusedUNet
from .cross_validation import (
    auto_bin_cap,
    check_auto_samples,
    check_num_timestep_bins,
    select_timestep_bins,
    solve_binned,
)
from .fitting_schedules import noising_process
from .fitting_utils import check_options, member_inputs, noised_batches, provenance_record, reduce_sum, shared_seed

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
        timestep_bin_selection (`dict` or `None`): with `num_timestep_bins="auto"`, the cross-validated choice
            (`num_timestep_bins`, `relative_smoothness`, `smoothness`) and the CV `curve` (also in `provenance`).
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
    timestep_bin_selection: Optional[Dict[str, Any]] = None


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


def _solve_bins(gram: torch.Tensor, linear: torch.Tensor, count: torch.Tensor, smoothness: float = 0.0) -> torch.Tensor:
    """Exact QP per bin from summed terms `(nb, k, k)`, `(nb, k)`, counts `(nb,)`; returns `(nb, k)`. A smoothness
    penalty between neighbouring bins (auto bins) makes it one joint QP."""
    if smoothness > 0:
        return solve_binned(gram, linear, count, smoothness)
    empty = (count == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"timestep bins {empty} received no noised samples; use fewer num_timestep_bins or more num_noise_draws"
        )
    return torch.stack([solve_simplex_qp(gram[i] / count[i], linear[i] / count[i]) for i in range(count.numel())])


def _bootstrap_standard_errors(
    sums: Dict[str, torch.Tensor], num_bootstrap: int, seed: int, smoothness: float = 0.0
) -> Optional[torch.Tensor]:
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
        replicates.append(_solve_bins(gram, linear, count, smoothness))
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
    fused: Union[FusedUNet, FusedTransformer],
    noise_scheduler: Any,
    latents: torch.Tensor,
    encoder_hidden_states: Optional[torch.Tensor] = None,
    *,
    unet_kwargs: Optional[Dict[str, Any]] = None,
    transformer_kwargs: Optional[Dict[str, Any]] = None,
    shared_kwargs: Optional[Dict[str, Any]] = None,
    method: str = "exact",
    num_noise_draws: int = 8,
    timestep_range: Union[str, Tuple[float, float]] = "full",
    timestep_density: Optional[str] = None,
    timestep_scale: Optional[float] = None,
    weighting: str = "uniform",
    snr_gamma: float = 5.0,
    num_timestep_bins: Union[int, str] = 1,
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
    target: str = "fusion",
    merge_max_iterations: int = 30,
) -> FitResult:
    r"""
    Fits the fusion weights to target samples by denoising score matching, exactly by default.

    For each target sample, `num_noise_draws` timesteps and noises are drawn, the k frozen members run once under
    `torch.no_grad()`, and ``G = E[w eps_i . eps_j]``, ``b = E[w eps_i . target]``, ``c = E[w |target|^2]`` are
    accumulated; ``min lambda^T G lambda - 2 b^T lambda`` over the simplex is then solved exactly (members can get
    weight exactly 0). For a [`FusedUNet`] the target is the noise (`"epsilon"`), the velocity (`"v_prediction"`) or
    the clean sample (`"sample"`), following `fused.config.prediction_type`. For a [`FusedTransformer`] of flow-matching
    members, ``x_t = (1 - t) x0 + t eps`` with ``t`` drawn as Diffusers' training scripts draw it (`timestep_density`,
    then the scheduler's training shift) and the target is the velocity ``eps - x0``.

    Args:
        fused ([`FusedUNet`] or [`FusedTransformer`]): the members; left unchanged unless `set_weights=True`.
        noise_scheduler (`SchedulerMixin`): the members' training noise schedule: for a `FusedUNet` a DDPM-family
            scheduler (its `alphas_cumprod`) whose `prediction_type` and schedule match `fused`; for a
            `FusedTransformer` a flow-matching scheduler (its `num_train_timesteps`, and its `shift` unless
            `use_dynamic_shifting`) matching the members' schedule when `fused` records one.
        latents (`torch.Tensor`): the target samples in model space `(N, C, H, W)` (VAE latents shifted and scaled
            as the VAE config says, pixels in [-1, 1] for a pixel-space model; Flux: packed `(N, L, C)`), in `fused`'s
            dtype.
        encoder_hidden_states (`torch.Tensor`, *optional*): per-sample conditioning `(N, L, D)`; `None` for
            unconditional members.
        unet_kwargs, transformer_kwargs (`dict`, *optional*): more member inputs, for a `FusedUNet` (e.g. SDXL's
            `added_cond_kwargs`) or a `FusedTransformer` (e.g. `pooled_projections`, `guidance`). Tensors (also inside
            nested dicts) whose first dimension is N are indexed with the samples; other values are passed as is.
        shared_kwargs (`dict`, *optional*): member inputs passed as they are to every batch, never indexed (e.g.
            Flux's `img_ids` and `txt_ids`, whose first dimension is a sequence length).
        method (`str`): `"exact"` (one pass and the exact QP) or `"sgd"` (the paper's softmax-logit SGD).
        num_noise_draws (`int`): noise levels and noises drawn per target sample.
        timestep_range (`str` or `(low, high)`): `"full"` (the whole schedule, the paper's EMNIST setting),
            `"small_t"` (noise std ``sigma_t <= 0.1``, for flow matching ``t <= 0.1``: the barycenter of the clean
            distributions, the paper's 1-D setting) or bounds in the members' timestep units (inclusive integers for
            a `FusedUNet`; for a `FusedTransformer` ``low < high`` in ``[0, timestep_scale]``).
        timestep_density (`str`, *optional*): `FusedTransformer` only: `"uniform"` (default; Diffusers' Flux
            training script) or `"logit_normal"` (mean 0, std 1; the SD3 paper and script).
        timestep_scale (`float`, *optional*): `FusedTransformer` only: the members take ``timestep = t *
            timestep_scale``. Defaults to `num_train_timesteps` (SD3, Sana: the scheduler's timesteps); 1 for Flux and
            QwenImage, whose pipelines pass ``timestep / 1000``. Timestep bins and `timestep_range` use these units.
        weighting (`str`): w(t): `"uniform"`, `"snr"` or `"min_snr"` (with `snr_gamma`); flow-matching fits take
            `"uniform"` only.
        num_timestep_bins (`int` or `"auto"`): > 1 fits one weight vector per equal-width timestep bin from the same
            pass. `"auto"` chooses the number of bins (1, 2, 4, ... up to 16) and a smoothness penalty between
            neighbouring bins by 5-fold cross-validation of the held-out denoising loss over the target samples, from
            the same single pass (see `fitting/cross_validation.py`); the choice and CV curve are in
            `timestep_bin_selection` and the provenance.
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
        target (`str`): `"fusion"` (the weights of the k-forward fusion) or `"merge"`: the weights of the one-forward
            weight-space merge (``sum_i lambda_i theta_i`` of full fine-tunes, or the merged LoRA of a LoRA fusion),
            refined from the exact QP solution by projected gradient descent on the merged model's loss over the same
            noised samples; never worse than the QP start there (see `fitting/merge_fitting.py`). `loss` is then the
            merged model's loss and the provenance records the refit (`"merge_refit"`).
        merge_max_iterations (`int`): `target="merge"` only: the most gradient steps (each one forward and backward
            of the merged model over the noised samples, plus a forward per trial step).

    Returns:
        [`FitResult`]: weights, loss, per-member losses, forward count, standard errors, the quadratic, provenance.
    """
    if not isinstance(fused, (FusedUNet, FusedTransformer)):
        raise TypeError(f"fused must be a FusedUNet or a FusedTransformer, got {type(fused).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    auto_bins = check_num_timestep_bins(num_timestep_bins, method)
    if target != "fusion":
        from .merge_fitting import check_merge_target

        if auto_bins:
            raise ValueError("target='merge' fits one weight vector for the merged model; num_timestep_bins='auto' "
                             "chooses a table over timestep bins: pass num_timestep_bins=1")  # fmt: skip
        check_merge_target(fused, target, method, num_timestep_bins, merge_max_iterations)
    num_timestep_bins = 1 if auto_bins else num_timestep_bins
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
    process = noising_process(fused, noise_scheduler, timestep_range, weighting, snr_gamma, timestep_density,
                              timestep_scale)  # fmt: skip
    kwargs_name, wrong_name = ("transformer_kwargs", "unet_kwargs")
    if isinstance(fused, FusedUNet):
        kwargs_name, wrong_name = wrong_name, kwargs_name
    given = {"unet_kwargs": unet_kwargs, "transformer_kwargs": transformer_kwargs}
    if given[wrong_name] is not None:
        raise ValueError(f"{wrong_name} is for a {'FusedUNet' if wrong_name == 'unet_kwargs' else 'FusedTransformer'}; "
                         f"pass the {type(fused).__name__}'s inputs as {kwargs_name}")  # fmt: skip
    inputs = member_inputs(fused, latents, encoder_hidden_states, given[kwargs_name], kwargs_name, shared_kwargs)
    if auto_bins:
        check_auto_samples(latents.shape[0])
    bin_edges = process.bin_edges(auto_bin_cap(process) if auto_bins else num_timestep_bins)

    seed = shared_seed(generator, accelerator)
    num_samples, num_members = latents.shape[0], fused.config.num_members
    process_index = 0 if accelerator is None else accelerator.process_index
    indices = list(range(process_index, num_samples, num_processes))  # this process's shard
    is_main = accelerator is None or accelerator.is_main_process

    def batches() -> Iterator[Dict[str, torch.Tensor]]:
        return noised_batches(fused, process, latents, inputs, indices, seed, bin_edges, options)

    sums = _zero_sums(num_samples, bin_edges.numel() - 1, num_members)
    total = options["num_epochs"] if method == "sgd" else len(indices)
    progress = tqdm(total=total, desc=f"fit_weights ({method})", disable=not (progress_bar and is_main))
    with progress:
        if method == "sgd":
            sgd_weights, num_forward_passes = _sgd(batches, num_members, sums, options, progress)
        else:
            sgd_weights, num_forward_passes = None, _exact_pass(batches, num_members, sums, progress, accelerator)
    sums = {name: reduce_sum(value, accelerator) for name, value in sums.items()}
    num_forward_passes = int(reduce_sum(torch.tensor([float(num_forward_passes)]), accelerator).item())
    selection = None
    if auto_bins:  # from the summed per-sample terms: the same choice on every process
        sums, bin_edges, selection = select_timestep_bins(sums, bin_edges, seed)
        options["num_timestep_bins"] = selection["num_timestep_bins"]
    range_name = timestep_range if isinstance(timestep_range, str) else None
    info = dict(method=method, process_record=process.record(), timestep_range_name=range_name,
                num_processes=num_processes, latents=latents, member_inputs=inputs, selection=selection,
                **options)  # fmt: skip
    if target == "merge":
        from .merge_fitting import refit_for_merge

        result = _finish(fused, sums, sgd_weights, num_forward_passes, bin_edges, seed, dict(info, set_weights=False))
        return refit_for_merge(fused, result, process, latents, inputs, indices, seed,
                               dict(options, merge_max_iterations=merge_max_iterations), accelerator,
                               progress_bar and is_main)
    return _finish(fused, sums, sgd_weights, num_forward_passes, bin_edges, seed, info)


def _finish(
    fused: Union[FusedUNet, FusedTransformer],
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
    selection = info["selection"]
    smoothness = 0.0 if selection is None else selection["smoothness"]
    weights = _solve_bins(gram, linear, count, smoothness) if sgd_weights is None else sgd_weights  # (nb, k)
    total = count.sum()
    loss = sum(quadratic_loss(weights[i], gram[i], linear[i], constant[i]) for i in range(count.numel())) / total
    # one member alone: lambda = e_i  =>  G_ii - 2 b_i + c, over all bins
    per_model_loss = (gram.sum(0).diagonal() - 2 * linear.sum(0) + constant.sum()) / total
    standard_errors = None
    if info["method"] == "exact":
        standard_errors = _bootstrap_standard_errors(sums, info["num_bootstrap"], seed + 1, smoothness)
    binned = count.numel() > 1
    squeeze = (lambda x: x) if binned else (lambda x: None if x is None else x[0])  # noqa: E731
    edges = bin_edges.tolist() if binned else None
    result_weights, result_errors = squeeze(weights), squeeze(standard_errors)
    provenance = provenance_record(info, float(loss), per_model_loss, result_errors, num_forward_passes, seed, edges)
    if selection is not None:
        provenance["timestep_bin_selection"] = selection
    result = FitResult(
        weights=result_weights, loss=float(loss), per_model_loss=per_model_loss, num_forward_passes=num_forward_passes,
        standard_errors=result_errors, timestep_bin_edges=edges, gram=squeeze(gram / count[:, None, None]),
        linear=squeeze(linear / count[:, None]), constant=squeeze(constant / count), provenance=provenance,
        timestep_bin_selection=selection,
    )  # fmt: skip
    if info["set_weights"]:
        fused.set_weights(result_weights, timestep_bin_edges=edges, provenance=provenance)
    return result
