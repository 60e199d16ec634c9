"""The pure merge maths: concatenated LoRA factors, SVD truncation, weighted parameter sums."""

import pytest
import torch

from diffusers_scorefusion.fusion.merge_utils import (
    concatenate_lora_factors,
    first_differing_parameter,
    lora_delta,
    truncate_lora,
    weighted_parameter_sum,
)


@pytest.mark.parametrize("kernel", [(), (3, 3)])
def test_concatenated_factors_give_the_weighted_sum_of_deltas_with_zero_blocks(kernel):
    generator = torch.Generator().manual_seed(0)
    ranks, coefficients = [2, 3, 4], [0.5, -1.5, 2.0]
    ones = (1,) * len(kernel)
    lora_As = [torch.randn(r, 5, *kernel, generator=generator) for r in ranks]
    lora_Bs = [torch.randn(7, r, *ones, generator=generator) for r in ranks]
    lora_As[1] = lora_Bs[1] = None  # member 1 does not adapt this layer
    merged_A, merged_B = concatenate_lora_factors(lora_As, lora_Bs, coefficients, ranks)
    assert merged_A.shape == (9, 5, *kernel) and merged_B.shape == (7, 9, *ones)
    expected = coefficients[0] * lora_delta(lora_As[0], lora_Bs[0]) + coefficients[2] * lora_delta(lora_As[2],
                                                                                                     lora_Bs[2])
    torch.testing.assert_close(lora_delta(merged_A, merged_B), expected)
    if kernel:  # a conv LoRA: a k x k conv then a 1 x 1 conv is one conv with the delta as kernel
        x = torch.randn(1, 5, 8, 8, generator=generator)
        two_convs = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, merged_A, padding=1), merged_B)
        torch.testing.assert_close(two_convs, torch.nn.functional.conv2d(x, expected, padding=1), atol=1e-4, rtol=1e-4)


def test_truncation_is_exact_at_full_rank_optimal_below_and_padded_above_the_true_rank():
    generator = torch.Generator().manual_seed(1)
    lora_A, lora_B = torch.randn(6, 20, generator=generator), torch.randn(12, 6, generator=generator)
    delta = lora_delta(lora_A, lora_B)
    singular = torch.linalg.svdvals(delta.double())
    for rank in (1, 3, 6):
        new_A, new_B, error = truncate_lora(lora_A, lora_B, rank)
        assert new_A.shape == (rank, 20) and new_B.shape == (12, rank)
        actual = float((lora_delta(new_A, new_B) - delta).norm() / delta.norm())
        assert error == pytest.approx(actual, abs=1e-5)
        assert error == pytest.approx(float(singular[rank:].norm() / singular.norm()), abs=1e-5)  # Eckart-Young
    low_A, low_B = lora_A[:2], lora_B[:, :2]  # a rank-2 delta truncated to rank 5: exact, padded with zeros
    new_A, new_B, error = truncate_lora(low_A, low_B, 5)
    assert error < 1e-6 and new_A.shape == (5, 20)
    torch.testing.assert_close(lora_delta(new_A, new_B), lora_delta(low_A, low_B), atol=1e-5, rtol=1e-5)
    zero_A, zero_B, error = truncate_lora(lora_A, torch.zeros_like(lora_B), 2)
    assert error == 0.0 and not lora_delta(zero_A, zero_B).any()


def test_weighted_parameter_sum_and_the_first_differing_parameter():
    generator = torch.Generator().manual_seed(2)
    states = [{"w": torch.randn(3, 4, generator=generator), "steps": torch.tensor([5])} for _ in range(3)]
    merged = weighted_parameter_sum(states, [0.2, 0.0, 0.8])
    torch.testing.assert_close(merged["w"], 0.2 * states[0]["w"] + 0.8 * states[2]["w"])
    assert torch.equal(merged["steps"], torch.tensor([5]))
    assert torch.equal(weighted_parameter_sum(states, [0.0, 1.0, 0.0])["w"], states[1]["w"])  # one-hot: exact
    states[2]["steps"] = torch.tensor([6])
    with pytest.raises(ValueError, match="non-float tensor 'steps' differs between member 0 and member 2"):
        weighted_parameter_sum(states, [0.2, 0.0, 0.8])
    assert first_differing_parameter([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}]) == (
        "parameter 'w' has shape (2,) in member 0 and (3,) in member 1")
    assert first_differing_parameter([{"w": torch.zeros(2)}, {"w": torch.zeros(2), "v": torch.zeros(1)}]) == (
        "member 1 has parameter 'v' (1,), member 0 has none")
    with pytest.raises(ValueError, match="one weight per state dict expected, got 2 weights for 3"):
        weighted_parameter_sum(states, [0.5, 0.5])
