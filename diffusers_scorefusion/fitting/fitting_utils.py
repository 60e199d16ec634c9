"""Plumbing for `fit_weights`: option checks, per-sample noise, noised batches through the members, process sums."""

import hashlib
import numbers
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch

from ..fusion.fusion_utils import LOSS_WEIGHTINGS, score_matching_statistics, timestep_bins

TIMESTEP_RANGES = ("full", "small_t")
SMALL_T_MAX_SIGMA = 0.1  # "small_t": timesteps whose noise std sigma_t = sqrt(1 - alphas_cumprod[t]) is at most this


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_float(value: Any, name: str, low: float, high: float, high_inclusive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    inside = low < value <= high if high_inclusive else low <= value < high
    if not inside:
        interval = f"({low}, {high}]" if high_inclusive else f"[{low}, {high})"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return float(value)


def check_options(**options: Any) -> Dict[str, Any]:
    """Validates `fit_weights`' scalar options and returns them as a dict."""
    for name in ("num_noise_draws", "num_timestep_bins", "batch_size", "num_epochs"):
        _check_int(options[name], name, 1)
    _check_int(options["num_bootstrap"], "num_bootstrap", 0)
    if options["weighting"] not in LOSS_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {LOSS_WEIGHTINGS}, got {options['weighting']!r}")
    _check_float(options["snr_gamma"], "snr_gamma", 0.0, float("inf"))
    _check_float(options["learning_rate"], "learning_rate", 0.0, float("inf"))
    _check_float(options["momentum"], "momentum", 0.0, 1.0, high_inclusive=False)
    if options["generator"] is not None and not isinstance(options["generator"], torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(options['generator']).__name__}")
    if options["callback"] is not None and not callable(options["callback"]):
        raise TypeError(f"callback must be callable, got {options['callback']!r}")
    if not isinstance(options["set_weights"], bool):
        raise TypeError(f"set_weights must be True or False, got {options['set_weights']!r}")
    return options


def check_tensor(value: Any, name: str) -> None:
    """A floating-point tensor without NaN or inf."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if not torch.isfinite(value).all():
        bad = (~torch.isfinite(value)).flatten(1).any(1).nonzero().flatten().tolist() if value.ndim > 1 else []
        raise ValueError(f"{name} contains NaN or inf" + (f" (rows {bad[:10]})" if bad else ""))


# PIL modes converted to RGB as PIL does (alpha dropped, grey repeated); other modes (16-bit, float) are refused.
PIL_MODES = ("RGB", "RGBA", "RGBa", "L", "LA", "La", "P", "PA", "1", "CMYK", "YCbCr")


def _pil_to_rgb(image: PIL.Image.Image, index: int) -> PIL.Image.Image:
    if image.mode not in PIL_MODES:
        raise ValueError(f"images[{index}] has PIL mode {image.mode!r}; expected 8-bit images (modes {PIL_MODES})")
    return image if image.mode == "RGB" else image.convert("RGB")


def _array_to_unit_range(image: Any, index: int) -> Any:
    """A numpy array `(H, W, 3)`/`(N, H, W, 3)` or tensor `(3, H, W)`/`(N, 3, H, W)` as floats: uint8 0..255 divided
    by 255, floats kept in [0, 1] (or [-1, 1], as `VaeImageProcessor` takes them); anything else refused."""
    is_tensor = isinstance(image, torch.Tensor)
    shape, layout = tuple(image.shape), "(3, H, W) or (N, 3, H, W)" if is_tensor else "(H, W, 3) or (N, H, W, 3)"
    channels = (shape[-3] if is_tensor else shape[-1]) if len(shape) in (3, 4) else None
    if channels != 3:
        kind = "tensors" if is_tensor else "arrays"
        raise ValueError(
            f"images[{index}] has shape {shape}; {kind} must be RGB, {layout} (convert grey or RGBA first)"
        )
    if 0 in shape:
        raise ValueError(f"images[{index}] is empty (shape {shape}); fitting needs at least one target image")
    dtype = str(image.dtype)
    if dtype in ("uint8", "torch.uint8"):
        return image.float() / 255 if is_tensor else image.astype(np.float32) / 255
    if not (image.is_floating_point() if is_tensor else np.issubdtype(image.dtype, np.floating)):
        raise TypeError(f"images[{index}] has dtype {dtype}; expected uint8 (0..255) or floats in [0, 1]")
    values = image.detach().float() if is_tensor else torch.from_numpy(np.asarray(image, dtype=np.float32))
    if not torch.isfinite(values).all():
        raise ValueError(f"images[{index}] contains NaN or inf")
    low, high = values.min().item(), values.max().item()
    if low < -1 or high > 1:
        raise ValueError(
            f"images[{index}] has values in [{low:g}, {high:g}]; float images must be in [0, 1] (or [-1, 1]); "
            "give 0..255 pixels as uint8"
        )
    return image


def check_images(images: Any, height: Optional[int], width: Optional[int], vae_scale_factor: int) -> List[Any]:
    """The images as `VaeImageProcessor.preprocess` takes them: PIL images in RGB, or float arrays/tensors of 3
    channels in [0, 1] (or [-1, 1]); the size (or `height`/`width`, which resize) must be a multiple of
    `vae_scale_factor`, as the stock pipelines require. Refuses anything else with a sentence."""
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ValueError("images is empty: fitting needs at least one target image")
    kinds = {type(item) for item in items}
    if not all(isinstance(item, (PIL.Image.Image, np.ndarray, torch.Tensor)) for item in items) or (
        len({PIL.Image.Image if issubclass(kind, PIL.Image.Image) else kind for kind in kinds}) > 1
    ):
        raise TypeError(
            "images must be PIL images, numpy arrays or torch tensors (one kind), "
            f"got {sorted(k.__name__ for k in kinds)}"
        )
    for name, value in (("height", height), ("width", width)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % vae_scale_factor
        ):
            raise ValueError(
                f"{name} must be a positive multiple of {vae_scale_factor} (the VAE factor), got {value!r}"
            )
    pil = isinstance(items[0], PIL.Image.Image)
    items = [_pil_to_rgb(item, i) if pil else _array_to_unit_range(item, i) for i, item in enumerate(items)]
    sizes = {(item.size[1], item.size[0]) if pil else tuple(item.shape[-2:] if isinstance(item, torch.Tensor)
                                                            else item.shape[-3:-1]) for item in items}  # fmt: skip
    if len(sizes) > 1 and not (pil and height is not None and width is not None):
        raise ValueError(
            f"all images must have the same size (height, width), got {sorted(sizes)}"
            + ("; pass height= and width= to resize them first" if pil else "")
        )
    for image_height, image_width in sizes:
        target = (height or image_height, width or image_width)
        if target[0] % vae_scale_factor or target[1] % vae_scale_factor:
            raise ValueError(
                f"image size {image_height}x{image_width} is not a multiple of the VAE factor {vae_scale_factor}; "
                f"pass height= and width= (multiples of {vae_scale_factor}) to resize"
            )
    return items


def resolve_timestep_range(timestep_range: Union[str, Sequence[int]], alphas_cumprod: torch.Tensor) -> Tuple[int, int]:
    """Inclusive integer timestep bounds for `"full"`, `"small_t"` or `(t_min, t_max)`."""
    num_train_timesteps = alphas_cumprod.numel()
    if isinstance(timestep_range, str):
        if timestep_range not in TIMESTEP_RANGES:
            raise ValueError(
                f"timestep_range must be one of {TIMESTEP_RANGES} or (t_min, t_max), got {timestep_range!r}"
            )
        if timestep_range == "full":
            return 0, num_train_timesteps - 1
        sigma = (1 - alphas_cumprod.to(torch.float64)).sqrt()
        small = int((sigma <= SMALL_T_MAX_SIGMA).sum())  # sigma_t increases with t
        if small == 0:
            raise ValueError(
                f"timestep_range='small_t' is empty: sigma_0 = {sigma[0].item():.4f} > {SMALL_T_MAX_SIGMA}"
            )
        return 0, small - 1
    bounds = list(timestep_range) if isinstance(timestep_range, (list, tuple)) else None
    if (
        bounds is None
        or len(bounds) != 2
        or not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in bounds)
    ):
        raise TypeError(f"timestep_range must be {TIMESTEP_RANGES} or two ints (t_min, t_max), got {timestep_range!r}")
    t_min, t_max = int(bounds[0]), int(bounds[1])
    if not 0 <= t_min <= t_max <= num_train_timesteps - 1:
        raise ValueError(
            f"timestep_range must satisfy 0 <= t_min <= t_max <= {num_train_timesteps - 1}, got {timestep_range!r}"
        )
    return t_min, t_max


def derived_seed(*keys: int) -> int:
    """A 63-bit seed from non-negative integer keys (numpy's SeedSequence hashing: well-mixed, platform-independent)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def reduce_sum(tensor: torch.Tensor, accelerator: Optional[Any]) -> torch.Tensor:
    """Sum over processes (identity on one process)."""
    if accelerator is None or accelerator.num_processes == 1:
        return tensor
    from accelerate.utils import reduce

    return reduce(tensor.to(accelerator.device), reduction="sum").cpu()


def shared_seed(generator: Optional[torch.Generator], accelerator: Optional[Any]) -> int:
    """The base seed of the noise: drawn from `generator` (or torch's global RNG) on the main process, shared by all."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    if accelerator is None or accelerator.num_processes == 1:
        return seed
    mine = torch.tensor([seed if accelerator.is_main_process else 0], dtype=torch.int64)
    return int(reduce_sum(mine, accelerator).item())


def _draws(
    seed: int, index: int, num_draws: int, process: Any, shape: Sequence[int]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sample `index`'s timesteps `(D,)` (drawn by the noising `process`) and noises `(D, ...)`: from its own seed,
    on the CPU, in float32."""
    generator = torch.Generator().manual_seed(derived_seed(seed, 0, index))
    timesteps = process.draw(num_draws, generator)
    noise = torch.randn((num_draws, *shape), generator=generator, dtype=torch.float32)
    return timesteps, noise


def _select(value: Any, rows: torch.Tensor, num_samples: int) -> Any:
    """Indexes tensors (also in nested dicts) whose first dimension is the number of samples; keeps the rest."""
    if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == num_samples:
        return value[rows.to(value.device)]
    if isinstance(value, dict):
        return {key: _select(item, rows, num_samples) for key, item in value.items()}
    return value


def _run_batch(
    fused: Any,
    process: Any,
    latents: torch.Tensor,
    member_inputs: Tuple[Dict[str, Any], Dict[str, Any]],
    rows: List[Tuple[int, torch.Tensor, torch.Tensor]],
    bin_edges: torch.Tensor,
) -> Dict[str, torch.Tensor]:
    """Noises a batch with `process`, runs every member once, returns per-row quadratic terms (float64, CPU)."""
    sample_index = torch.tensor([row[0] for row in rows])  # (B,)
    timesteps = torch.stack([row[1] for row in rows])  # (B,)
    noise = torch.stack([row[2] for row in rows]).to(latents.device)  # (B, C, H, W)
    x0 = latents[sample_index.to(latents.device)]  # (B, C, H, W)
    sample = process.noisy_sample(x0, noise, timesteps)  # x_t
    per_sample, shared = member_inputs
    kwargs = {**_select(per_sample, sample_index, latents.shape[0]), **shared}
    with torch.no_grad():
        outputs = fused.member_outputs(sample, process.model_timesteps(timesteps, sample), **kwargs)  # (k, B, C, H, W)
    finite = torch.isfinite(outputs).flatten(1).all(1)  # (k,)
    if not finite.all():
        raise ValueError(
            f"members {(~finite).nonzero().flatten().tolist()} returned NaN or inf on samples "
            f"{sorted(set(sample_index.tolist()))[:10]} at timesteps {timesteps.tolist()[:10]}; no weights were set"
        )
    target = process.target(x0, noise, timesteps)  # (B, C, H, W)
    loss_weights = process.loss_weights(timesteps)  # w(t), (B,)
    gram, linear, constant = score_matching_statistics(outputs, target, loss_weights.to(x0.device))
    return dict(sample_index=sample_index, bin=timestep_bins(timesteps, bin_edges), gram=gram.cpu(),
                linear=linear.cpu(), constant=constant.cpu())  # fmt: skip


def noised_batches(
    fused: Any,
    process: Any,
    latents: torch.Tensor,
    member_inputs: Tuple[Dict[str, Any], Dict[str, Any]],
    indices: Sequence[int],
    seed: int,
    bin_edges: torch.Tensor,
    options: Dict[str, Any],
) -> Iterator[Dict[str, torch.Tensor]]:
    """Per-row quadratic terms for `indices`' samples, `num_noise_draws` rows each, `batch_size` rows per forward.

    `member_inputs` is `(per_sample, shared)`: the first are indexed with each batch's samples."""
    pending: List[Tuple[int, torch.Tensor, torch.Tensor]] = []
    batch_size = options["batch_size"]
    for index in indices:
        timesteps, noise = _draws(seed, index, options["num_noise_draws"], process, latents.shape[1:])
        pending.extend((index, timesteps[d], noise[d]) for d in range(timesteps.numel()))
        while len(pending) >= batch_size:
            yield _run_batch(fused, process, latents, member_inputs, pending[:batch_size], bin_edges)
            pending = pending[batch_size:]
    if pending:
        yield _run_batch(fused, process, latents, member_inputs, pending, bin_edges)


def data_fingerprint(tensors: Sequence[Optional[torch.Tensor]]) -> str:
    """sha256 of the tensors' shapes, dtypes and bytes."""
    digest = hashlib.sha256()
    for tensor in tensors:
        if tensor is None:
            continue
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{tuple(data.shape)}|{data.dtype}|".encode())
        digest.update(data.flatten().view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def member_inputs(
    fused: Any,
    latents: Any,
    encoder_hidden_states: Optional[torch.Tensor],
    unet_kwargs: Optional[Dict[str, Any]],
    kwargs_name: str = "unet_kwargs",
    shared_kwargs: Optional[Dict[str, Any]] = None,
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Validates the data; returns the keyword arguments the members get: `(per_sample, shared)`.

    `unet_kwargs` (named `kwargs_name` in messages) are indexed per batch where their first dimension is N;
    `shared_kwargs` are passed to every batch as they are. Latents are `(N, C, ...)`, or for a `FusedTransformer`
    also packed `(N, L, C)` (Flux), the channels last.
    """
    check_tensor(latents, "latents")
    if latents.ndim < 2 or latents.shape[0] == 0:
        raise ValueError(f"latents must have shape (N, C, ...) with N >= 1, got shape {tuple(latents.shape)}")
    packed = latents.ndim == 3 and hasattr(fused, "transformers")
    channels = latents.shape[-1] if packed else latents.shape[1]
    if channels != fused.config.in_channels:
        layout = "packed (N, L, C) latents have" if packed else "latents have"
        raise ValueError(f"{layout} {channels} channels but the members take in_channels={fused.config.in_channels}")
    out_channels = fused.config.out_channels or fused.config.in_channels  # transformers may leave it None: same
    if out_channels != fused.config.in_channels:
        raise ValueError(
            f"members output {out_channels} channels for {fused.config.in_channels} input channels; "
            "fitting needs predictions of the sample's shape"
        )
    if latents.dtype != fused.dtype:  # devices may differ: the fusion hands each member its inputs on its device
        raise ValueError(f"latents are {latents.dtype} but the members are {fused.dtype}; convert them with .to()")
    for name, value in ((kwargs_name, unet_kwargs), ("shared_kwargs", shared_kwargs)):
        if value is not None and not isinstance(value, dict):
            raise TypeError(f"{name} must be a dict, got {type(value).__name__}")
    member_inputs = dict(unet_kwargs or {})
    shared = dict(shared_kwargs or {})
    both = sorted(set(member_inputs) & set(shared))
    if both:
        raise ValueError(f"{both} given both in {kwargs_name} and in shared_kwargs")
    if encoder_hidden_states is not None:
        if "encoder_hidden_states" in member_inputs or "encoder_hidden_states" in shared:
            raise ValueError(f"encoder_hidden_states given both as an argument and in {kwargs_name} or shared_kwargs")
        check_tensor(encoder_hidden_states, "encoder_hidden_states")
        if encoder_hidden_states.ndim < 2 or encoder_hidden_states.shape[0] != latents.shape[0]:
            raise ValueError(
                f"encoder_hidden_states must have one row per sample, shape ({latents.shape[0]}, ...), got "
                f"{tuple(encoder_hidden_states.shape)}"
            )
        width = getattr(fused.config, "cross_attention_dim", None)
        expected = None if not isinstance(width, int) else width * getattr(fused, "num_encoder_slots", 1)
        if expected is not None and encoder_hidden_states.shape[-1] != expected:
            raise ValueError(
                f"encoder_hidden_states have width {encoder_hidden_states.shape[-1]} (shape "
                f"{tuple(encoder_hidden_states.shape)}) but the members take cross_attention_dim={width}"
                + (f" for each of {expected // width} text encoders ({expected})" if expected != width else "")
            )
        member_inputs["encoder_hidden_states"] = encoder_hidden_states
    check_finite_inputs(member_inputs, kwargs_name)
    check_finite_inputs(shared, "shared_kwargs")
    return member_inputs, shared


def check_finite_inputs(value: Any, name: str) -> None:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        check_tensor(value, name)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_finite_inputs(item, f"{name}[{key!r}]")


def provenance_record(
    info: Dict[str, Any],
    loss: float,
    per_model_loss: torch.Tensor,
    standard_errors: Optional[torch.Tensor],
    num_forward_passes: int,
    seed: int,
    bin_edges: Optional[List[float]],
) -> Dict[str, Any]:
    """A JSON-serialisable record of how the weights were obtained."""
    from .. import __version__  # imported late: the package imports this module

    provenance = dict(
        method=info["method"],
        library=f"diffusers-scorefusion {__version__}",
        num_samples=int(info["latents"].shape[0]),
        num_noise_draws=info["num_noise_draws"],
        **info["process_record"],
        timestep_range_name=info["timestep_range_name"],
        weighting=info["weighting"],
        num_timestep_bins=info["num_timestep_bins"],
        timestep_bin_edges=bin_edges,
        batch_size=info["batch_size"],
        loss=loss,
        per_model_loss=per_model_loss.tolist(),
        standard_errors=None if standard_errors is None else standard_errors.tolist(),
        num_bootstrap=info["num_bootstrap"] if info["method"] == "exact" else 0,
        num_forward_passes=num_forward_passes,
        seed=None if info["generator"] is None else int(info["generator"].initial_seed()),
        noise_seed=seed,
        num_processes=info["num_processes"],
        data_fingerprint=data_fingerprint([info["latents"], info["member_inputs"][0].get("encoder_hidden_states")]),
    )
    if info["weighting"] == "min_snr":
        provenance["snr_gamma"] = info["snr_gamma"]
    if info["method"] == "sgd":
        provenance.update(num_epochs=info["num_epochs"], learning_rate=info["learning_rate"], momentum=info["momentum"])
    return provenance
