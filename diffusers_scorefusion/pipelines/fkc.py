"""Feynman-Kac corrector (SMC) sampling of the KL barycenter: a Diffusers `callback_on_step_end`.

The plain fused sampler does not sample ``p_lambda ∝ prod_i p_i^lambda_i`` (the fused score is not the noised
barycenter's for ``t > 0``). [`FeynmanKacCorrector`] treats the images of one prompt (`num_images_per_prompt`) as
particles, gives each a log-weight built from the member predictions the fusion already made at this step (no extra
network call; maths in `fusion.smc_utils`), and resamples a prompt's particles when their effective sample size
drops. A step-end callback, like Diffusers' own (`SDCFGCutoffCallback`) and [`LangevinCorrector`], because it works
unchanged with `ScoreFusionPipeline`, `ScoreFusionXLPipeline` and stock SD / SDXL pipelines whose `unet` is a
[`FusedUNet`] (and flow-matching Sana / SD3 pipelines whose `transformer` is a [`FusedTransformer`], with the SDE
DPM-Solver on flow sigmas), and it may replace every per-sample tensor the pipeline exposes to callbacks.
"""

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from diffusers.callbacks import PipelineCallback
from diffusers.configuration_utils import register_to_config

from ..fusion.fusion_utils import alpha_sigma
from ..fusion.smc_utils import (
    effective_sample_size,
    fkc_flow_step_factor,
    fkc_log_weight_increment,
    fkc_step_factor,
    group_gather_indices,
    guidance_exponents,
    reweight_and_resample,
)
from .corrector import SD_TENSOR_INPUTS, SDXL_TENSOR_INPUTS  # noqa: F401  (re-exported for `tensor_inputs=`)

STOCHASTIC_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "EulerAncestralDiscreteScheduler",
                         "DPMSolverMultistepScheduler")  # fmt: skip
SDE_ALGORITHMS = ("sde-dpmsolver", "sde-dpmsolver++")
USE_INSTEAD = ("DDPMScheduler, EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler(algorithm_type="
               "'sde-dpmsolver++') or DDIMScheduler with eta > 0")  # fmt: skip
# Scheduler attributes that hold one entry per sample between steps (multistep history).
SCHEDULER_SAMPLE_STATE = ("model_outputs", "last_sample", "sample")


FLOW_USE_INSTEAD = ("DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type='flow_prediction', "
                    "algorithm_type='sde-dpmsolver++', flow_shift=...)")  # fmt: skip


def is_flow_scheduler(scheduler: Any) -> bool:
    """Whether `scheduler` samples a flow-matching model (flow sigmas, flow predictions, or no `alphas_cumprod`)."""
    config = getattr(scheduler, "config", {})
    flow_config = bool(config.get("use_flow_sigmas", False)) or config.get("prediction_type") == "flow_prediction"
    return flow_config or not isinstance(getattr(scheduler, "alphas_cumprod", None), torch.Tensor)


def check_fkc_scheduler(scheduler: Any) -> Optional[torch.Tensor]:
    """The scheduler's `alphas_cumprod`, or `None` for the stochastic flow scheduler (DPM-Solver SDE with flow sigmas);
    refuses deterministic schedulers and FlowMatchEulerDiscreteScheduler(stochastic_sampling=True) with a sentence."""
    name = type(scheduler).__name__
    algorithm = getattr(scheduler.config, "algorithm_type", None)
    if is_flow_scheduler(scheduler):
        config = scheduler.config
        if (name == "DPMSolverMultistepScheduler" and config.get("use_flow_sigmas", False)
                and config.get("prediction_type") == "flow_prediction" and algorithm == "sde-dpmsolver++"):  # fmt: skip
            return None
        if config.get("stochastic_sampling", False):
            raise ValueError(
                f"FeynmanKacCorrector does not support {name}(stochastic_sampling=True): it re-draws all the noise at "
                f"every step instead of simulating a reverse SDE; for flow-matching pipelines use {FLOW_USE_INSTEAD}"
            )
        if algorithm in SDE_ALGORITHMS:  # an SDE, but not the flow configuration FKC reads its t from
            raise ValueError(
                f"FeynmanKacCorrector supports flow-matching only with {FLOW_USE_INSTEAD}, got {name}(algorithm_type="
                f"{algorithm!r}, use_flow_sigmas={config.get('use_flow_sigmas')!r}, prediction_type="
                f"{config.get('prediction_type')!r})"
            )
        kind = f"{name}(algorithm_type={algorithm!r})" if algorithm is not None else name
        raise ValueError(
            f"FeynmanKacCorrector needs a stochastic flow scheduler (resampled copies of a particle must be separated "
            f"by fresh noise), got the deterministic flow-matching {kind}: use {FLOW_USE_INSTEAD}"
        )
    if name not in STOCHASTIC_SCHEDULERS or (name == "DPMSolverMultistepScheduler" and algorithm not in SDE_ALGORITHMS):
        kind = f"{name}(algorithm_type={algorithm!r})" if algorithm is not None else name
        raise ValueError(
            f"FeynmanKacCorrector needs a stochastic scheduler (resampled copies of a particle must be separated by "
            f"fresh noise), got the deterministic {kind}: use {USE_INSTEAD}"
        )
    return scheduler.alphas_cumprod


def fusion_denoiser(pipeline: Any) -> Any:
    """The pipeline's fusion: `pipe.unet`, else `pipe.transformer` (Sana, SD3, ...)."""
    for name in ("unet", "transformer"):
        denoiser = getattr(pipeline, name, None)
        if hasattr(denoiser, "capture_member_predictions"):
            return denoiser
    found = type(getattr(pipeline, "unet", getattr(pipeline, "transformer", None))).__name__
    raise TypeError(f"FeynmanKacCorrector needs a fusion as pipe.unet or pipe.transformer, got {found}")


class FeynmanKacCorrector(PipelineCallback):
    r"""
    A `callback_on_step_end` that samples the KL barycenter of a fusion with Feynman-Kac correctors (SMC).

    The `num_images_per_prompt` images of each prompt are its particles. After every scheduler step each particle's
    log-weight gains ``-(g^2 dt / 2) sum_j beta_j ||s_j - s_bar||^2`` from the member predictions of that step (under
    classifier-free guidance the experts are each member's unconditional and conditional predictions, with exponents
    ``lambda_i (1 - w)`` and ``lambda_i w``); when a prompt's effective sample size falls below
    `ess_threshold * num_particles` its particles are resampled (systematic) and their log-weights reset. Resampling
    copies every per-sample tensor the callback receives (latents, prompt embeddings, SDXL's `add_text_embeds` and
    `add_time_ids`, both halves under guidance) and the scheduler's per-sample history, never across prompts.

    Run the pipeline inside `pipe.unet.capture_member_predictions()` so the fusion hands its per-member predictions
    to the callback (no copies, no extra forwards). Flow-matching pipelines whose `transformer` is a fusion (Sana;
    use `pipe.transformer.capture_member_predictions()`) are supported with the stochastic flow scheduler
    `DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
    algorithm_type="sde-dpmsolver++")`: the step's ``t`` and ``t_prev`` are read from the scheduler's `sigmas`.

    ```py
    fkc = FeynmanKacCorrector(num_particles=4)
    with pipe.unet.capture_member_predictions():
        images = pipe(prompt, num_images_per_prompt=4, callback_on_step_end=fkc).images
    ```

    Args:
        num_particles (`int`): particles per prompt: the pipeline's `num_images_per_prompt` (>= 2).
        ess_threshold (`float`): resample a prompt's particles when ESS < `ess_threshold * num_particles` (in
            ``[0, 1]``; 0 never resamples before the end, 1 whenever a prompt's weights are unequal).
        resample_at_end (`bool`): resample once more after the last step (the returned images then carry equal
            weights).
        active_timesteps (`tuple[float, float]`, *optional*): only steps whose timestep ``t`` satisfies
            ``low <= t <= high`` (training timestep units, as the pipeline passes them to the UNet) update the
            weights and may resample; default every step.
        increment_clamp (`float`, *optional*): centre each step's increments within a prompt and clamp them to
            ``[-increment_clamp, increment_clamp]`` (the FKC image code uses 1 or 2 against weight degeneracy in
            high dimension; this biases the target); default no clamping.
        generator (`torch.Generator`, *optional*): draws the resampling offsets (not saved in the config).
        tensor_inputs (`list[str]`): the loop variables the callback reads and resamples: `SD_TENSOR_INPUTS`
            (default) or `SDXL_TENSOR_INPUTS`.

    Attributes (reset at step 0 of every call):
        log_weights (`torch.Tensor`): `(num_prompts, num_particles)` current log-weights (0 after a resampling).
        ess_history (`list[torch.Tensor]`): the ESS `(num_prompts,)` after each step's update.
        resampling_steps (`list[tuple[int, list[int]]]`): `(step_index, prompts resampled)` for every resampling.
        ancestors (`list[torch.Tensor]`): the `(num_prompts, num_particles)` ancestor indices of every resampling.
    """

    ignore_for_config = ["generator"]

    @register_to_config
    def __init__(
        self,
        num_particles: int,
        ess_threshold: float = 0.5,
        resample_at_end: bool = True,
        active_timesteps: Optional[Tuple[float, float]] = None,
        increment_clamp: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        tensor_inputs: Sequence[str] = SD_TENSOR_INPUTS,
    ):
        if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 2:
            raise ValueError(f"num_particles must be an int >= 2 (num_images_per_prompt), got {num_particles!r}")
        valid_threshold = isinstance(ess_threshold, (int, float)) and not isinstance(ess_threshold, bool)
        if not valid_threshold or not 0 <= ess_threshold <= 1:
            raise ValueError(f"ess_threshold must be a number in [0, 1], got {ess_threshold!r}")
        if active_timesteps is not None and (len(active_timesteps) != 2 or active_timesteps[0] > active_timesteps[1]):
            raise ValueError(f"active_timesteps must be (low, high) with low <= high, got {active_timesteps!r}")
        if increment_clamp is not None and not increment_clamp > 0:
            raise ValueError(f"increment_clamp must be > 0 or None, got {increment_clamp!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if "latents" not in tensor_inputs or "prompt_embeds" not in tensor_inputs:
            raise ValueError(f"tensor_inputs must include 'latents' and 'prompt_embeds', got {list(tensor_inputs)}")
        self.generator = generator
        self.log_weights: Optional[torch.Tensor] = None
        self.ess_history: List[torch.Tensor] = []
        self.resampling_steps: List[Tuple[int, List[int]]] = []
        self.ancestors: List[torch.Tensor] = []
        self._copied_last_step: Optional[torch.Tensor] = None

    @property
    def tensor_inputs(self) -> list:
        return list(self.config.tensor_inputs)

    # ------------------------------------------------------------------------------------------------ weights
    def _increments(self, pipeline: Any, step_index: int, timestep: Any, batch: int) -> torch.Tensor:
        """This step's log-weight increments `(batch,)` from the fusion's captured member predictions."""
        fusion = fusion_denoiser(pipeline)
        captured = fusion.last_member_predictions
        if captured is None:
            raise ValueError(
                "no member predictions were captured: run the pipeline inside `with pipe.unet."
                "capture_member_predictions():` (`pipe.transformer.` for transformer pipelines)"
            )
        if not torch.equal(captured.timestep.flatten()[:1].cpu().double(),
                           torch.as_tensor(timestep).flatten()[:1].cpu().double()):  # fmt: skip
            raise ValueError(
                f"the captured predictions are for timestep {captured.timestep.flatten()[0].item()}, not this step's "
                f"{float(timestep)}: put FeynmanKacCorrector before any callback that runs the denoiser"
            )
        weights = captured.weights
        if weights.ndim == 2:
            if not (weights == weights[:1]).all():
                raise ValueError("FeynmanKacCorrector needs one weight row per step, got per-sample weights")
            weights = weights[0]
        if weights.ndim != 1:
            raise ValueError(
                f"FeynmanKacCorrector needs scalar member weights, got weights of shape "
                f"{tuple(captured.weights.shape)} (regional masks are not a product of densities)"
            )
        if float(getattr(pipeline, "guidance_rescale", 0.0) or 0.0) > 0:
            raise ValueError(f"FeynmanKacCorrector does not support guidance_rescale > 0, got "
                             f"{pipeline.guidance_rescale}")  # fmt: skip
        guided = bool(getattr(pipeline, "do_classifier_free_guidance", False))
        predictions = torch.stack(captured.predictions)  # (k, B or 2B, ...)
        if predictions.shape[1] != batch * (2 if guided else 1):
            raise ValueError(f"captured predictions have batch {predictions.shape[1]}, latents have {batch}")
        experts = torch.cat(predictions.chunk(2, dim=1)) if guided else predictions  # (2k or k, B, ...)
        exponents = guidance_exponents(weights, pipeline.guidance_scale if guided else None)
        scheduler = pipeline.scheduler
        alphas_cumprod = check_fkc_scheduler(scheduler)
        if alphas_cumprod is None:  # flow sigmas: sigma = t; velocity differences are noise differences / (1 - t)
            sigma_t, sigma_prev = (float(sigma) for sigma in scheduler.sigmas[step_index : step_index + 2])
            factor = fkc_flow_step_factor(sigma_t, sigma_prev)
            return fkc_log_weight_increment(experts, exponents, factor * (1.0 - sigma_t) ** 2)
        timesteps = scheduler.timesteps
        t = torch.as_tensor(timestep, dtype=torch.float64).flatten()[:1].cpu()
        alpha_t, sigma_t = alpha_sigma(alphas_cumprod.cpu(), t)
        if step_index + 1 < len(timesteps):
            next_timestep = timesteps[step_index + 1 : step_index + 2].cpu()
            alpha_bar_prev = float(alpha_sigma(alphas_cumprod.cpu(), next_timestep)[0] ** 2)
        else:
            alpha_bar_prev = float(getattr(scheduler, "final_alpha_cumprod", 1.0))
        if float(alpha_t) == 0:  # zero terminal SNR: at pure noise the experts' exact scores agree, no weight
            return torch.zeros(batch, dtype=torch.float64)
        factor = fkc_step_factor(float(alpha_t**2), max(alpha_bar_prev, float(alpha_t**2)))
        # differences of noise predictions from the fused parameterisation: eps = a * output + b * x_t
        prediction_type = scheduler.config.get("prediction_type", "epsilon")
        scale = {"epsilon": 1.0, "v_prediction": float(alpha_t), "sample": float(alpha_t / sigma_t)}[prediction_type]
        return fkc_log_weight_increment(experts, exponents, factor * scale**2)

    # ------------------------------------------------------------------------------------------------ resampling
    def _gather(self, pipeline: Any, callback_kwargs: Dict[str, Any], index: torch.Tensor, batch: int) -> None:
        """Copies particles `index` `(batch,)` into every per-sample tensor and the scheduler's history."""
        for name, value in callback_kwargs.items():
            if not isinstance(value, torch.Tensor) or value.ndim == 0:
                continue
            if value.shape[0] == batch:
                callback_kwargs[name] = value[index.to(value.device)]
            elif value.shape[0] == 2 * batch:  # guidance: [unconditional; conditional]
                callback_kwargs[name] = value[torch.cat([index, index + batch]).to(value.device)]
        for name in SCHEDULER_SAMPLE_STATE:
            state = getattr(pipeline.scheduler, name, None)
            if isinstance(state, torch.Tensor) and state.ndim > 0 and state.shape[0] == batch:
                setattr(pipeline.scheduler, name, state[index.to(state.device)])
            elif isinstance(state, list):
                setattr(pipeline.scheduler, name, [item[index.to(item.device)] if isinstance(item, torch.Tensor)
                                                   and item.ndim > 0 and item.shape[0] == batch else item
                                                   for item in state])  # fmt: skip

    def _check_groups(self, callback_kwargs: Dict[str, Any], num_groups: int, guided: bool) -> None:
        """Refuses groups of particles whose prompt embeddings differ (num_particles != num_images_per_prompt)."""
        embeds = callback_kwargs["prompt_embeds"]
        if guided and embeds.shape[0] == 2 * num_groups * self.config.num_particles:
            embeds = embeds.chunk(2)[1]  # the conditional half
        grouped = embeds.reshape(num_groups, self.config.num_particles, -1)
        if not (grouped == grouped[:, :1]).all():
            raise ValueError(
                f"the particles of a group must share one prompt: num_particles ({self.config.num_particles}) must "
                f"equal the pipeline's num_images_per_prompt"
            )

    def _check_noise_added(self, latents: torch.Tensor) -> None:
        """After a resampling, copies of one particle must have been separated by the scheduler's noise."""
        copied, self._copied_last_step = self._copied_last_step, None
        if copied is None:
            return
        flat = latents.flatten(1)
        for first, second in copied.tolist():
            if torch.equal(flat[first], flat[second]):
                raise ValueError(
                    f"resampled copies stayed identical through a scheduler step: the scheduler added no noise "
                    f"(DDIMScheduler with eta=0?); use {USE_INSTEAD}"
                )

    def callback_fn(
        self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: Dict[str, Any]
    ) -> Dict[str, Any]:
        if "Flux" in type(pipeline).__name__:
            raise ValueError(
                f"FeynmanKacCorrector does not support {type(pipeline).__name__} yet (its callback does not hand over "
                "the prompt embeddings by default, it passes timestep / 1000 to the transformer, and true CFG runs the "
                "transformer twice per step): use an SD3 or Sana fusion with DPMSolverMultistepScheduler("
                "use_flow_sigmas=True, prediction_type='flow_prediction', algorithm_type='sde-dpmsolver++')"
            )
        latents = callback_kwargs["latents"]
        batch, num = latents.shape[0], self.config.num_particles
        if batch % num != 0:
            raise ValueError(f"latents batch {batch} is not a multiple of num_particles {num}")
        groups = batch // num
        if step_index == 0:
            check_fkc_scheduler(pipeline.scheduler)
            self._check_groups(callback_kwargs, groups, bool(getattr(pipeline, "do_classifier_free_guidance", False)))
            self.log_weights = torch.zeros(groups, num, dtype=torch.float64)
            self.ess_history, self.resampling_steps, self.ancestors = [], [], []
            self._copied_last_step = None
        self._check_noise_added(latents)
        low, high = self.config.active_timesteps or (-float("inf"), float("inf"))
        active = low <= float(torch.as_tensor(timestep).flatten()[0]) <= high
        last = step_index + 1 >= len(pipeline.scheduler.timesteps)
        increments = None
        if active:
            increments = self._increments(pipeline, step_index, timestep, batch).cpu().reshape(groups, num)
        force = last and self.config.resample_at_end
        if not active and not force:
            self.ess_history.append(effective_sample_size(self.log_weights))
            return callback_kwargs
        self.log_weights, ess, ancestors = reweight_and_resample(
            self.log_weights, increments, self.config.ess_threshold, self.config.increment_clamp, force, self.generator
        )
        self.ess_history.append(ess)
        if ancestors is not None:
            self._gather(pipeline, callback_kwargs, group_gather_indices(ancestors), batch)
            self.ancestors.append(ancestors)
            resampled = (ess < self.config.ess_threshold * num) | force
            self.resampling_steps.append((step_index, resampled.nonzero().flatten().tolist()))
            # the next step must separate copies (checked unless it is the last: final steps add no noise)
            first_copy: Dict[int, int] = {}
            pairs = [(first_copy.setdefault(a, n), n) for n, a in enumerate(group_gather_indices(ancestors).tolist())]
            pairs = [pair for pair in pairs if pair[0] != pair[1]]
            next_is_last = step_index + 2 >= len(pipeline.scheduler.timesteps)
            self._copied_last_step = torch.tensor(pairs) if pairs and not next_is_last else None
        return callback_kwargs
