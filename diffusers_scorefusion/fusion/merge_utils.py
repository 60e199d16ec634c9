"""Weight-space merging maths, pure torch (no Diffusers): LoRA factors concatenated or truncated by SVD, and weighted
sums of full parameter sets.

A LoRA adapts a layer of weight ``W`` (``(out, in)``, or ``(out, in, kh, kw)`` for a convolution) by
``delta = scale * B @ A`` with ``A = lora_A.weight`` (``(r, in, ...)``) and ``B = lora_B.weight`` (``(out, r, ...)``).
Merging k LoRAs with fusion weights ``lambda_i`` is exact by concatenating the factors:
``sum_i lambda_i scale_i B_i A_i = [lambda_1 scale_1 B_1, ..., lambda_k scale_k B_k] @ [A_1; ...; A_k]``.
"""

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    """``B @ A`` reshaped to the adapted layer's weight: `(out, in)` for linear layers, `(out, in, kh, kw)` for
    convolutions (A carries the kernel, B is 1x1)."""
    rank = lora_A.shape[0]
    delta = lora_B.reshape(lora_B.shape[0], rank) @ lora_A.reshape(rank, -1)  # (out, in * kh * kw)
    return delta.reshape(lora_B.shape[0], *lora_A.shape[1:])


def concatenate_lora_factors(
    lora_As: Sequence[Optional[torch.Tensor]],
    lora_Bs: Sequence[Optional[torch.Tensor]],
    coefficients: Sequence[float],
    ranks: Sequence[int],
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""
    The factors of one LoRA equal to ``sum_i coefficients[i] * B_i @ A_i`` (with scale 1), of rank ``sum(ranks)``.

    Args:
        lora_As, lora_Bs: member `i`'s `lora_A` / `lora_B` weights, or `None` for a member that does not adapt this
            layer (it gets a zero block of `ranks[i]` rows in A and columns in B).
        coefficients: ``lambda_i * scale_i``, folded into the B blocks.
        ranks: each member's block width (its rank here, or the width of its zero block).

    Returns:
        `(lora_A, lora_B)` of shapes `(sum(ranks), in, ...)` and `(out, sum(ranks), ...)`.
    """
    if not (len(lora_As) == len(lora_Bs) == len(coefficients) == len(ranks)):
        raise ValueError(
            f"one A, B, coefficient and rank per member expected, got {len(lora_As)}, {len(lora_Bs)}, "
            f"{len(coefficients)} and {len(ranks)}"
        )
    present = [i for i, (a, b) in enumerate(zip(lora_As, lora_Bs)) if a is not None and b is not None]
    if not present:
        raise ValueError("at least one member must adapt the layer, got no lora_A/lora_B pair")
    template_A, template_B = lora_As[present[0]], lora_Bs[present[0]]
    blocks_A, blocks_B = [], []
    for i, (lora_A, lora_B) in enumerate(zip(lora_As, lora_Bs)):
        if (lora_A is None) != (lora_B is None):
            raise ValueError(f"member {i} has only one of lora_A and lora_B")
        if lora_A is None:
            lora_A = template_A.new_zeros(ranks[i], *template_A.shape[1:])
            lora_B = template_B.new_zeros(template_B.shape[0], ranks[i], *template_B.shape[2:])
        elif lora_A.shape[0] != ranks[i] or lora_B.shape[1] != ranks[i]:
            shapes = f"A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)}"
            raise ValueError(f"member {i}: factors of rank {ranks[i]} expected, got {shapes}")
        blocks_A.append(lora_A)
        blocks_B.append(lora_B * coefficients[i])
    return torch.cat(blocks_A, dim=0), torch.cat(blocks_B, dim=1)  # (R, in, ...), (out, R, ...)


def truncate_lora(lora_A: torch.Tensor, lora_B: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor, float]:
    r"""
    The best rank-`rank` approximation (Frobenius norm, Eckart-Young) of ``delta = B @ A``, as LoRA factors.

    Computed from QR decompositions of the factors and an SVD of the small core ``R_B R_A^T`` (never forms `delta`),
    in float64. The singular values are split evenly between the factors. If `delta` has fewer than `rank` non-zero
    singular values the factors are padded with zeros.

    Returns:
        `(lora_A, lora_B, relative_error)`, the factors in the input dtype, with ``relative_error =
        ||delta - B' A'||_F / ||delta||_F`` (0 for a zero `delta`).
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    full_rank, out = lora_A.shape[0], lora_B.shape[0]
    B = lora_B.reshape(out, full_rank).double()  # (out, R)
    A = lora_A.reshape(full_rank, -1).double()  # (R, in')
    q_B, r_B = torch.linalg.qr(B)  # (out, m), (m, R)
    q_A, r_A = torch.linalg.qr(A.T)  # (in', n), (n, R)
    U, S, Vh = torch.linalg.svd(r_B @ r_A.T)  # core (m, n): delta = q_B U diag(S) Vh q_A^T
    kept = min(rank, S.numel())
    root = S[:kept].sqrt()
    new_B = B.new_zeros(out, rank)
    new_A = A.new_zeros(rank, A.shape[1])
    new_B[:, :kept] = (q_B @ U[:, :kept]) * root  # (out, kept)
    new_A[:kept] = root[:, None] * (Vh[:kept] @ q_A.T)  # (kept, in')
    total = S.square().sum()
    error = float((S[kept:].square().sum() / total).sqrt()) if total > 0 else 0.0
    new_A = new_A.reshape(rank, *lora_A.shape[1:]).to(lora_A.dtype)
    new_B = new_B.reshape(out, rank, *lora_B.shape[2:]).to(lora_B.dtype)
    return new_A, new_B, error


def first_differing_parameter(state_dicts: Sequence[Mapping[str, torch.Tensor]]) -> Optional[str]:
    """A sentence naming the first parameter (in member 0's order) that another state dict lacks, or holds with
    another shape or dtype, or the first extra parameter of another one; `None` when all share names and shapes."""
    reference = state_dicts[0]
    for i, other in enumerate(state_dicts[1:], start=1):
        for name, value in reference.items():
            if name not in other:
                return f"member 0 has parameter {name!r} {tuple(value.shape)}, member {i} has none"
            if other[name].shape != value.shape:
                return (f"parameter {name!r} has shape {tuple(value.shape)} in member 0 and "
                        f"{tuple(other[name].shape)} in member {i}")  # fmt: skip
            if other[name].dtype != value.dtype:
                return f"parameter {name!r} is {value.dtype} in member 0 and {other[name].dtype} in member {i}"
        extra = [name for name in other if name not in reference]
        if extra:
            return f"member {i} has parameter {extra[0]!r} {tuple(other[extra[0]].shape)}, member 0 has none"
    return None


def weighted_parameter_sum(
    state_dicts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> Dict[str, torch.Tensor]:
    r"""
    ``sum_i weights[i] * theta_i`` parameter by parameter (accumulated in float64, returned in each tensor's dtype).

    Floating-point tensors are summed; other tensors (integer buffers) must be equal in every state dict and are
    copied. State dicts that differ in names, shapes or dtypes are refused, naming the first differing parameter.
    """
    if len(state_dicts) != len(weights) or not state_dicts:
        raise ValueError(f"one weight per state dict expected, got {len(weights)} weights for {len(state_dicts)}")
    differing = first_differing_parameter(state_dicts)
    if differing is not None:
        raise ValueError(f"the members do not share one architecture: {differing}")
    merged: Dict[str, torch.Tensor] = {}
    for name, value in state_dicts[0].items():
        tensors: List[torch.Tensor] = [state_dict[name] for state_dict in state_dicts]
        if not value.is_floating_point():
            unequal = [i for i, tensor in enumerate(tensors) if not torch.equal(tensor, value)]
            if unequal:
                raise ValueError(f"non-float tensor {name!r} differs between member 0 and member {unequal[0]}")
            merged[name] = value.clone()
            continue
        total = torch.zeros(value.shape, dtype=torch.float64, device=value.device)
        for weight, tensor in zip(weights, tensors):
            total += float(weight) * tensor.to(device=value.device, dtype=torch.float64)  # lambda_i theta_i
        merged[name] = total.to(value.dtype)
    return merged
