"""`FusedModelMixin`: what every fused denoiser shares, whatever its members are (UNets, transformers).

Weights on the simplex (one row, or a `(num_bins, k)` table over timestep bins), per-call overrides, the fused
forward that skips members whose weight is 0, member placement, and helpers forwarded to every member.
"""

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from .fusion_utils import WeightsLike, check_bin_edges, combine_predictions, timestep_bins
from .member_utils import copy_containers, distinct_models
from .offload_utils import enable_group_offload_per_member, run_on_member_device
from .peft_utils import FusedPeftMixin
from .regional_utils import check_weights_or_masks, combine_masked_predictions


class MemberHelperMissing(AttributeError):
    """Raised on access to a fusion helper that a member lacks (so `hasattr(fusion, name)` is False, as on a model
    without it, and a call says which member lacks what)."""


class member_method:
    """A fusion method that calls the member method of the same name on every member, with the same arguments.

    It exists only when every member has that method: otherwise `hasattr(fusion, name)` is False (Diffusers then
    treats the fusion as it treats a model without it) and calling it raises [`MemberHelperMissing`] naming the
    members that lack it.
    """

    def __init__(self, doc: str = ""):
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, fusion: Any, owner: Optional[type] = None) -> Any:
        if fusion is None:
            return self
        lacking = [f"member {i} ({type(member).__name__})" for i, member in enumerate(fusion.fusion_members)
                   if not hasattr(member, self.name)]  # fmt: skip
        if lacking:
            raise MemberHelperMissing(
                f"{self.name}() cannot be applied to the fusion: {', '.join(lacking)} has no {self.name}()"
            )
        return functools.partial(fusion._call_on_members, self.name)


def replace_first_field(output: Any, value: torch.Tensor) -> Any:
    """`output` (a `BaseOutput` or a tuple) with its first field set to `value`, the other fields kept."""
    if isinstance(output, BaseOutput):
        first = next(iter(output.keys()))
        return type(output)(**{**output, first: value})
    return (value, *tuple(output)[1:])


@dataclass
class MemberPredictions:
    """One fused forward's per-member predictions, for sampler hooks such as [`FeynmanKacCorrector`].

    Args:
        predictions (`tuple[torch.Tensor]`): the run members' predictions in the fused parameterisation, each
            `(B, ...)` (the tensors the forward combined, not copies).
        weights (`torch.Tensor`): the weights they were combined with, `(len(members),)` or `(B, len(members))`.
        members (`tuple[int]`): the indices of the members run (members whose weight was 0 are not run).
        timestep (`torch.Tensor`): the timestep of the call.
    """

    predictions: Tuple[torch.Tensor, ...]
    weights: torch.Tensor
    members: Tuple[int, ...]
    timestep: torch.Tensor


class FusedModelMixin(FusedPeftMixin, ModelMixin, ConfigMixin):
    r"""
    The fusion core shared by [`FusedUNet`] and the other fused denoisers.

    A subclass keeps its members in an `nn.ModuleList` named by `members_attribute`, registers `num_members` in its
    config, and calls `set_weights` at the end of `__init__`. Its `forward` builds each member's keyword arguments
    and calls [`~FusedModelMixin.fuse`].
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = False
    # The `nn.ModuleList` attribute that holds the members (`"unets"` for FusedUNet).
    members_attribute = "members_list"
    # Weights for the current call only (`override_weights`), or `None`.
    _weights_override: Optional[torch.Tensor] = None
    # The last forward's per-member predictions while `capture_member_predictions` is on; `None` (nothing kept) off.
    last_member_predictions: Optional[MemberPredictions] = None
    _capturing_member_predictions: bool = False

    # Config entries every fusion registers itself; a subclass adds its own in `own_config_keys`.
    base_config_keys = ("num_members", "weights", "timestep_bin_edges", "weights_provenance")
    own_config_keys: Tuple[str, ...] = ()

    @classmethod
    def _reserved_config_keys(cls) -> Tuple[str, ...]:
        """Keys a fusion never mirrors from its members: its own config entries and its attribute names (a config
        key becomes an attribute). The fusion's own entries win over a member's."""
        return cls.base_config_keys + cls.own_config_keys + tuple(name for name in dir(cls) if not name.startswith("_"))

    @property
    def fusion_members(self) -> nn.ModuleList:
        """The members, in order."""
        return getattr(self, self.members_attribute)

    # ----------------------------------------------------------------------------------------------- weights
    def set_weights(
        self,
        weights: WeightsLike,
        timestep_bin_edges: Optional[Sequence[float]] = None,
        provenance: Optional[Dict[str, Any]] = None,
    ) -> None:
        """Sets the fusion weights: `(k,)`, or a `(num_bins, k)` table with `timestep_bin_edges`; or regional weights,
        per-member masks `(k, H, W)` (`(num_bins, k, H, W)` with bins) at the latents' or the image's resolution,
        non-negative and summing to 1 at every position (see `fusion.regional_utils`).

        `provenance` (JSON-serialisable: how the weights were obtained) is stored in the config beside them and
        saved wherever the fusion is saved; setting weights without it clears the previous provenance.
        """
        table = check_weights_or_masks(weights, self.config.num_members)
        edges = None
        if timestep_bin_edges is not None:
            edges = check_bin_edges(timestep_bin_edges, table.shape[0]).tolist()
        elif table.shape[0] > 1:
            raise ValueError(
                f"weights with {table.shape[0]} rows need timestep_bin_edges ({table.shape[0] + 1} numbers)"
            )
        stored = table[0].tolist() if torch.as_tensor(weights).ndim in (1, 3) else table.tolist()
        if provenance is not None and not isinstance(provenance, dict):
            raise TypeError(f"provenance must be a dict, got {type(provenance).__name__}")
        self.register_to_config(weights=stored, timestep_bin_edges=edges, weights_provenance=provenance)
        self._weights_table = table

    @property
    def fusion_weights(self) -> torch.Tensor:
        """The weights in use: `(k,)`, or `(num_bins, k)` for noise-level-dependent weights; masks `(k, H, W)` or
        `(num_bins, k, H, W)` for regional weights (float64, CPU)."""
        table = self._weights_override if self._weights_override is not None else self._weights_table
        return table[0] if self.config.timestep_bin_edges is None else table

    @contextlib.contextmanager
    def override_weights(self, weights: Optional[WeightsLike]) -> Iterator[None]:
        """Uses `weights` (shape `(k,)` or the stored table's shape) inside the `with` block; `None` changes nothing."""
        if weights is None:
            yield
            return
        table = check_weights_or_masks(weights, self.config.num_members, name="fusion_weights")
        num_bins = self._weights_table.shape[0]
        if table.shape[0] == 1 and num_bins > 1:
            table = table.expand(num_bins, *table.shape[1:])
        elif table.shape[0] != num_bins:
            shapes = f"(k,) or ({num_bins}, k)" if table.ndim == 2 else f"(k, H, W) or ({num_bins}, k, H, W)"
            raise ValueError(f"fusion_weights must have shape {shapes}, got {tuple(table.shape)}")
        previous, self._weights_override = self._weights_override, table
        try:
            yield
        finally:
            self._weights_override = previous

    def step_weights(self, timestep: Union[torch.Tensor, float, int], batch_size: int) -> torch.Tensor:
        """Weights for this call: `(k,)` when every sample shares a row, else `(B, k)`.

        Timestep bins are in the units of the `timestep` the pipeline passes to the model.
        """
        table = self._weights_override if self._weights_override is not None else self._weights_table
        if table.shape[0] == 1:
            return table[0]
        timesteps = torch.as_tensor(timestep).detach().cpu().flatten()
        rows = timestep_bins(timesteps, torch.tensor(self.config.timestep_bin_edges, dtype=torch.float64))
        if rows.numel() == 1 or (rows == rows[0]).all():
            return table[rows[0]]
        if rows.numel() != batch_size:
            raise ValueError(
                f"timestep must be a scalar or have {batch_size} entries, got shape {tuple(timesteps.shape)}"
            )
        if table.ndim == 4:
            raise ValueError(f"regional weights (masks) need the samples of one call in one timestep bin, got bins "
                             f"{sorted(set(rows.tolist()))}")  # fmt: skip
        return table[rows]  # (B, k)

    # ----------------------------------------------------------------------------------------------- forward
    def call_member(self, index: int, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Runs member `index` on `(sample, *args, **kwargs)`; `None`-valued keyword arguments are not passed.

        A member whose weights sit on another device (and that has no offloading hooks moving its inputs) gets its
        inputs moved there; its output comes back on `sample.device`.
        """
        kwargs = copy_containers({key: value for key, value in kwargs.items() if value is not None})
        return run_on_member_device(self.fusion_members[index], sample, *args, **kwargs)

    def fuse(
        self,
        timestep: Union[torch.Tensor, float, int],
        batch_size: int,
        run_member: Callable[[int], Any],
        convert: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
    ) -> Tuple[Any, torch.Tensor]:
        """``sum_i lambda_i output_i`` over the members whose weight at `timestep` is not 0 (the others are not run).

        `run_member(i)` returns member `i`'s output (a `BaseOutput` or a tuple, the prediction first); `convert(i, x)`
        maps its prediction to the fused parameterisation. Returns the first run member's output and the fused
        prediction.
        """
        weights = self.step_weights(timestep, batch_size)  # (k,), (B, k) or masks (k, H, W)
        masks = weights.ndim == 3
        if masks or weights.ndim == 1:
            active = (weights != 0).reshape(weights.shape[0], -1).any(1)
        else:
            active = (weights != 0).any(0)
        first_output, predictions = None, []
        for i in active.nonzero().flatten().tolist():
            output = run_member(i)
            first_output = output if first_output is None else first_output
            prediction = output[0]
            predictions.append(prediction if convert is None else convert(i, prediction))
        used = weights[active] if masks else weights[..., active]
        if self._capturing_member_predictions:
            self.last_member_predictions = MemberPredictions(
                tuple(predictions), used, tuple(active.nonzero().flatten().tolist()), torch.as_tensor(timestep).detach()
            )  # fmt: skip
        if masks:
            return first_output, combine_masked_predictions(predictions, used)
        return first_output, combine_predictions(predictions, used)

    @contextlib.contextmanager
    def capture_member_predictions(self) -> Iterator[None]:
        """Inside the `with` block every forward stores its per-member predictions and weights in
        `last_member_predictions` (a [`MemberPredictions`]: references, no copies; no extra member forwards); on
        exit the last one is dropped. Off by default. Used by [`FeynmanKacCorrector`]: wrap the pipeline call."""
        previous = self._capturing_member_predictions
        self._capturing_member_predictions = True
        try:
            yield
        finally:
            self._capturing_member_predictions = previous
            if not previous:
                self.last_member_predictions = None

    # ----------------------------------------------------------------------------------------------- helpers
    def _call_on_members(self, method: str, *args: Any, **kwargs: Any) -> List[Any]:
        """Calls `method` on every member; raises (calling none) if a member lacks it."""
        members = self.fusion_members
        missing = [f"member {i} ({type(member).__name__})" for i, member in enumerate(members)
                   if not hasattr(member, method)]  # fmt: skip
        if missing:
            raise NotImplementedError(
                f"{method}() cannot be applied to the fusion: {', '.join(missing)} has no {method}()"
            )
        return [getattr(member, method)(*args, **kwargs) for member in members]

    @property
    def attn_processors(self) -> Dict[str, Any]:
        """The members' attention processors under a single member's names (`down_blocks.0...processor`).

        Members share one layout (the same processor names): the values are member 0's, and processors set through
        the fusion are set on every member (IP-Adapter processors are shared objects). Members whose layouts differ
        are listed with a `{members_attribute}.{i}.` prefix instead.
        """
        per_member = [getattr(member, "attn_processors", {}) for member in self.fusion_members]
        if all(processors.keys() == per_member[0].keys() for processors in per_member):
            return dict(per_member[0])
        prefix = self.members_attribute
        return {
            f"{prefix}.{i}.{name}": proc for i, processors in enumerate(per_member) for name, proc in processors.items()
        }

    def set_attn_processor(self, processor: Any) -> None:
        """Sets one processor on every member, or a dict keyed like `attn_processors` (the same processor object for
        the same layer of every member)."""
        if not isinstance(processor, dict):
            self._call_on_members("set_attn_processor", processor)
            return
        expected = self.attn_processors.keys()
        if set(processor) != set(expected):
            unknown, missing = sorted(set(processor) - set(expected)), sorted(set(expected) - set(processor))
            raise ValueError(
                f"processor dict keys must match attn_processors; unknown {unknown[:3]}, missing {missing[:3]}"
            )
        for i, member in enumerate(self.fusion_members):
            prefix = f"{self.members_attribute}.{i}."
            if any(name.startswith(prefix) for name in processor):
                member.set_attn_processor({name[len(prefix):]: proc for name, proc in processor.items()
                                           if name.startswith(prefix)})  # fmt: skip
            else:
                member.set_attn_processor(dict(processor))

    set_default_attn_processor = member_method("Sets every member's default attention processor.")
    fuse_qkv_projections = member_method("Fuses the query, key and value projections of every member.")
    unfuse_qkv_projections = member_method("Undoes `fuse_qkv_projections` on every member.")
    enable_forward_chunking = member_method("`enable_forward_chunking(chunk_size=None, dim=0)` on every member.")
    disable_forward_chunking = member_method("Disables forward chunking on every member.")

    @property
    def original_attn_processors(self) -> Optional[Dict[str, Any]]:
        """Member 0's processors from before `fuse_qkv_projections` (members share one layout), or `None`."""
        return getattr(distinct_models(self.fusion_members)[0], "original_attn_processors", None)

    def __getattr__(self, name: str) -> Any:
        helper = getattr(type(self), name, None)
        if isinstance(helper, member_method):
            helper.__get__(self)  # raises MemberHelperMissing, naming the member that lacks it
        return super().__getattr__(name)

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """`torch.compile` applied to each member model in place (`nn.Module.compile`, same arguments): the fusion's
        Python loop and weights stay eager, so per-call weights and zero-weight skipping never retrace a graph."""
        for model in distinct_models(self.fusion_members):
            model.compile(*args, **kwargs)

    def compile_repeated_blocks(self, *args: Any, **kwargs: Any) -> None:
        """`ModelMixin.compile_repeated_blocks` on each member model (Diffusers' regional compilation)."""
        for model in distinct_models(self.fusion_members):
            model.compile_repeated_blocks(*args, **kwargs)

    def enable_group_offload(
        self,
        onload_device: Union[str, torch.device],
        offload_device: Union[str, torch.device] = torch.device("cpu"),
        **kwargs: Any,
    ) -> None:
        """`ModelMixin.enable_group_offload` (same arguments), applied to each member on its own (and so by
        `pipe.enable_group_offload`): at most one member's current group is on `onload_device` at a time."""
        enable_group_offload_per_member(self, onload_device, offload_device=offload_device, **kwargs)
