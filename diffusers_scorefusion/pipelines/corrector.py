"""A Langevin corrector for fused sampling: a Diffusers step-end callback and a function for hand-written loops.

Between two predictor steps (the scheduler's), the corrector runs a few Langevin steps with the model's score at the
noise level the latents have reached (Song et al., ICLR 2021, predictor-corrector samplers; maths in
`fusion.corrector_utils`). With a [`FusedUNet`] the score is the fused ``sum_i lambda_i s_i``, so at each level the
corrector pulls the latents towards ``prod_i p_{i,t}^lambda_i``: towards the KL barycenter itself as ``t -> 0``,
which the plain fused sampler does not sample exactly for ``t > 0``. Off unless asked for; each corrector step costs
one more forward of every member with a non-zero weight.
"""

from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch
from diffusers.callbacks import PipelineCallback
from diffusers.configuration_utils import register_to_config

from ..fusion.corrector_utils import (
    DEFAULT_SNR,
    check_corrector_options,
    langevin_correct_with_score,
    score_from_noise_pred,
)
from ..fusion.fusion_utils import alpha_sigma, convert_prediction

SD_TENSOR_INPUTS = ("latents", "prompt_embeds")
SDXL_TENSOR_INPUTS = ("latents", "prompt_embeds", "add_text_embeds", "add_time_ids")


def _check_scheduler(noise_scheduler: Any) -> torch.Tensor:
    """The scheduler's `alphas_cumprod`; refuses schedulers whose latents are not ``alpha_t x0 + sigma_t eps``."""
    alphas_cumprod = getattr(noise_scheduler, "alphas_cumprod", None)
    if not isinstance(alphas_cumprod, torch.Tensor):
        raise TypeError(
            f"noise_scheduler must have alphas_cumprod (a DDPM-family scheduler), got {type(noise_scheduler).__name__}"
        )
    init_noise_sigma = float(getattr(noise_scheduler, "init_noise_sigma", 1.0))
    if init_noise_sigma != 1.0:
        raise ValueError(
            f"the Langevin corrector needs latents x_t = alpha_t x0 + sigma_t eps (DDIM, DDPM, DPM-Solver, UniPC, "
            f"PNDM); {type(noise_scheduler).__name__} keeps latents scaled by init_noise_sigma = {init_noise_sigma:.4g}"
        )
    return alphas_cumprod


def langevin_correct(
    unet: Callable[..., Any],
    sample: torch.Tensor,
    timestep: Union[int, float, torch.Tensor],
    noise_scheduler: Any,
    num_corrector_steps: int = 1,
    snr: float = DEFAULT_SNR,
    generator: Optional[torch.Generator] = None,
    **unet_kwargs: Any,
) -> torch.Tensor:
    r"""
    Runs `num_corrector_steps` Langevin steps on `sample` at the noise level of `timestep`, with `unet`'s score.

    For hand-written sampling loops: call it on the sample returned by `scheduler.step(...)` with the *next* timestep
    (the noise level that sample is at), as [`LangevinCorrector`] does inside a pipeline.

    Args:
        unet (`Callable`): a model with the Diffusers UNet calling convention (`unet(sample, timestep,
            return_dict=False, **unet_kwargs)[0]`), e.g. a [`FusedUNet`]; its output type is the scheduler's
            `prediction_type`.
        sample (`torch.Tensor`): `(B, ...)` latents ``x_t = alpha_t x0 + sigma_t eps``.
        timestep (`int`, `float` or `torch.Tensor`): the (scalar) training timestep whose noise level `sample` has.
        noise_scheduler (`SchedulerMixin`): a scheduler of the DDPM family (`alphas_cumprod`, `prediction_type`).
        num_corrector_steps (`int`): Langevin steps (0 returns `sample` unchanged).
        snr (`float`): the target signal-to-noise ratio ``r`` that sets the step size (score_sde: 0.16).
        generator (`torch.Generator`, *optional*): draws the Langevin noise.

    Returns:
        `torch.Tensor`: the corrected sample, same shape and dtype.
    """
    check_corrector_options(num_corrector_steps, snr)
    alphas_cumprod = _check_scheduler(noise_scheduler)
    if num_corrector_steps == 0:
        return sample
    t = torch.as_tensor(timestep, dtype=torch.float64).flatten()
    if t.numel() != 1:
        raise ValueError(f"timestep must be a scalar, got shape {tuple(torch.as_tensor(timestep).shape)}")
    alpha_t, sigma_t = alpha_sigma(alphas_cumprod, t)  # (1,), (1,)
    previous = alpha_sigma(alphas_cumprod, (t - 1).clamp(min=0))[0]
    # 1 - beta_t = abar_t / abar_{t-1}  (abar_0 itself at t = 0)
    alpha_step = float(alpha_t**2 / previous**2) if float(t) >= 1 else float(alphas_cumprod[0])
    prediction_type = noise_scheduler.config.get("prediction_type", "epsilon")
    batch = sample.shape[0]

    def score_fn(x: torch.Tensor) -> torch.Tensor:
        model_output = unet(x, timestep, return_dict=False, **unet_kwargs)[0]
        noise_pred = convert_prediction(model_output, x, alpha_t.expand(batch), sigma_t.expand(batch),
                                        prediction_type, "epsilon")  # fmt: skip
        return score_from_noise_pred(noise_pred, sigma_t.to(x.device).expand(batch))

    return langevin_correct_with_score(score_fn, sample, num_corrector_steps, snr, alpha_step, generator)


class LangevinCorrector(PipelineCallback):
    r"""
    A `callback_on_step_end` that adds Langevin corrector steps to a Stable Diffusion (XL) pipeline's sampling loop.

    After each scheduler step but the last, runs `num_corrector_steps` Langevin steps at the next timestep's noise
    level with the pipeline's (fused, guided) score: `pipe(prompt, callback_on_step_end=LangevinCorrector(2))`.
    Works with [`ScoreFusionPipeline`], [`ScoreFusionXLPipeline`] and any SD pipeline whose `unet` is a
    [`FusedUNet`] (with a plain UNet it is an ordinary predictor-corrector sampler), with schedulers whose latents are
    ``alpha_t x0 + sigma_t eps`` (DDIM, DDPM, DPM-Solver, UniPC, PNDM). Classifier-free guidance is applied to the
    corrector's score as to the predictor's; `guidance_rescale`, IP-Adapter inputs and guidance-embedding UNets
    (`time_cond_proj_dim`) are not supported.

    Args:
        num_corrector_steps (`int`): Langevin steps per noise level (default 1).
        snr (`float`): target signal-to-noise ratio of the steps (default 0.16, score_sde's).
        generator (`torch.Generator`, *optional*): draws the Langevin noise (not saved in the config).
        tensor_inputs (`list[str]`): the loop variables the callback reads. The default suits Stable Diffusion;
            for SDXL pass `SDXL_TENSOR_INPUTS` (adds `add_text_embeds`, `add_time_ids`).

    Attributes:
        num_model_evaluations (`int`): UNet calls made by the corrector so far (each one runs every member with a
            non-zero weight, with a doubled batch under classifier-free guidance).
    """

    ignore_for_config = ["generator"]

    @register_to_config
    def __init__(
        self,
        num_corrector_steps: int = 1,
        snr: float = DEFAULT_SNR,
        generator: Optional[torch.Generator] = None,
        tensor_inputs: Sequence[str] = SD_TENSOR_INPUTS,
    ):
        check_corrector_options(num_corrector_steps, snr)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        missing = [name for name in SD_TENSOR_INPUTS if name not in tensor_inputs]
        if missing:
            raise ValueError(f"tensor_inputs must include {list(SD_TENSOR_INPUTS)}, got {list(tensor_inputs)}")
        self.generator = generator
        self.num_model_evaluations = 0

    @property
    def tensor_inputs(self) -> list:
        return list(self.config.tensor_inputs)

    def _added_cond_kwargs(self, pipeline: Any, callback_kwargs: Dict[str, Any]) -> Optional[Dict[str, torch.Tensor]]:
        if getattr(pipeline.unet.config, "time_cond_proj_dim", None) is not None:
            raise ValueError("LangevinCorrector does not support UNets with a guidance embedding (time_cond_proj_dim)")
        if getattr(pipeline.unet.config, "addition_embed_type", None) != "text_time":
            return None
        if "add_text_embeds" not in callback_kwargs or "add_time_ids" not in callback_kwargs:
            raise ValueError(
                f"an SDXL UNet needs add_text_embeds and add_time_ids: use LangevinCorrector(..., "
                f"tensor_inputs={list(SDXL_TENSOR_INPUTS)}), got tensor_inputs={self.tensor_inputs}"
            )
        return {"text_embeds": callback_kwargs["add_text_embeds"], "time_ids": callback_kwargs["add_time_ids"]}

    def callback_fn(
        self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: Dict[str, Any]
    ) -> Dict[str, Any]:
        timesteps = pipeline.scheduler.timesteps
        if step_index + 1 >= len(timesteps) or self.config.num_corrector_steps == 0:
            return callback_kwargs  # the last step ends at the data: no noise level left to correct at
        added_cond_kwargs = self._added_cond_kwargs(pipeline, callback_kwargs)
        prompt_embeds = callback_kwargs["prompt_embeds"]
        guidance = pipeline.do_classifier_free_guidance

        def guided_unet(sample: torch.Tensor, t: Any, return_dict: bool = False) -> tuple:
            model_input = torch.cat([sample] * 2) if guidance else sample
            model_output = pipeline.unet(model_input, t, encoder_hidden_states=prompt_embeds,
                                         cross_attention_kwargs=pipeline.cross_attention_kwargs,
                                         added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]  # fmt: skip
            self.num_model_evaluations += 1
            if guidance:
                uncond, text = model_output.chunk(2)
                model_output = uncond + pipeline.guidance_scale * (text - uncond)
            return (model_output,)

        callback_kwargs["latents"] = langevin_correct(
            guided_unet, callback_kwargs["latents"], timesteps[step_index + 1], pipeline.scheduler,
            num_corrector_steps=self.config.num_corrector_steps, snr=self.config.snr, generator=self.generator,
        )  # fmt: skip
        return callback_kwargs
