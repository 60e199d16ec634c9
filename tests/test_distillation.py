"""`distill`: one student model regressed on the fusion's prediction, early-stopped on held-out teacher targets."""

import copy

import pytest
import torch

from diffusers_scorefusion import FusedUNet
from diffusers_scorefusion.baking.distillation import _lora_student, distill
from diffusers_scorefusion.fitting.merge_fitting import MergedPredictor
from diffusers_scorefusion.testing.unet_parts import get_dummy_scheduler, get_dummy_unet

OPTIONS = dict(num_generated=2, num_inference_steps=2, num_noise_draws=4, max_steps=20, batch_size=8,
               learning_rate=1e-3, eval_every=5, patience=2, progress_bar=False)  # fmt: skip


def data(num_samples=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((num_samples, 4, 16, 16), generator=generator), torch.randn((num_samples, 5, 32),
                                                                                    generator=generator)


def lora_fusion(weights):
    pytest.importorskip("peft")
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    base = get_dummy_unet(0)
    loras = []
    for seed, targets in ((10, ["to_q", "to_v"]), (11, ["to_q", "to_k", "proj_in"])):  # modules only one adapts
        torch.manual_seed(seed)
        adapted = copy.deepcopy(base)
        adapted.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False))
        loras.append({f"unet.{k}": v for k, v in get_peft_model_state_dict(adapted).items()})
    return FusedUNet.from_lora(base, loras, weights=weights)


def test_merged_student_beats_its_starting_point_on_held_out_teacher_loss():
    fused = FusedUNet([get_dummy_unet(0), get_dummy_unet(1)], weights=[0.6, 0.4])
    samples, hidden = data()
    output = distill(fused, get_dummy_scheduler(), samples, encoder_hidden_states=hidden,
                     generator=torch.Generator().manual_seed(0), **OPTIONS)  # fmt: skip
    assert output.best_step > 0 and output.validation_loss < output.initial_validation_loss
    assert type(output.model) is type(fused.unets[0]) and output.adapter_name is None
    assert output.history[0]["validation_loss"] == output.initial_validation_loss
    assert min(h["validation_loss"] for h in output.history) == output.validation_loss
    # members untouched
    assert torch.equal(fused.unets[0].conv_in.weight, get_dummy_unet(0).conv_in.weight)
    # 2 members x (2 generated x 2 steps + teacher batches: 4 + 2 clean samples, 2 held out, x 4 draws, 8 a batch)
    assert output.num_teacher_forward_passes == 2 * (2 * 2 + 16 // 8 + 8 // 8)


def test_lora_student_starts_at_the_merged_lora():
    fused = lora_fusion([0.3, 0.7])
    samples, hidden = data(2)
    generator = torch.Generator().manual_seed(1)
    sample, timestep = torch.randn((2, 4, 16, 16), generator=generator), torch.tensor([50, 900])
    predictor = MergedPredictor(fused)
    merged = predictor(fused.fusion_weights, sample, timestep, encoder_hidden_states=hidden)
    for rank, exact in ((4, True), (1, False)):  # rank 4 = 2 + 2 holds the merged delta exactly, rank 1 does not
        base, trainable = _lora_student(predictor, fused.fusion_weights, rank)
        assert base.active_adapters() == ["distilled"] and base.peft_config["distilled"].r == rank
        assert {id(p) for p in trainable} == {id(p) for n, p in base.named_parameters() if ".distilled." in n}
        with torch.no_grad():
            start = base(sample, timestep, encoder_hidden_states=hidden).sample
        assert torch.allclose(start, merged, atol=1e-5) == exact
        base.delete_adapters("distilled")


def test_lora_student_beats_its_starting_point_on_held_out_teacher_loss():
    fused = lora_fusion([0.3, 0.7])
    samples, hidden = data()
    output = distill(fused, get_dummy_scheduler(), samples, student="lora", rank=1, encoder_hidden_states=hidden,
                     generator=torch.Generator().manual_seed(0), **OPTIONS)  # fmt: skip
    assert output.adapter_name == "distilled" and output.model is fused.unets[0].base
    assert output.best_step > 0 and output.validation_loss < output.initial_validation_loss
    assert fused.unets[0].base.peft_config["distilled"].r == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(student="distilled"), "student must be one of"),
        (dict(student="lora"), "rank is required for student='lora'"),
        (dict(student="merged", rank=4), "rank is required for student='lora' and only for it"),
        (dict(samples=torch.zeros((0, 4, 16, 16))), "samples must be a non-empty batch"),
        (dict(samples=torch.zeros((1, 4, 16, 16)), num_generated=0), "at least 2 clean samples"),
        (dict(validation_fraction=1.0), "validation_fraction must be in"),
        (dict(student="lora", rank=2), "needs a LoRA fusion"),
    ],
)
def test_distill_bad_inputs(kwargs, message):
    fused = FusedUNet([get_dummy_unet(0), get_dummy_unet(1)])
    samples = kwargs.pop("samples", torch.zeros((2, 4, 16, 16)))
    with pytest.raises(ValueError, match=message):
        distill(fused, get_dummy_scheduler(), samples, encoder_hidden_states=torch.zeros((samples.shape[0], 5, 32)),
                progress_bar=False, **kwargs)  # fmt: skip


def test_distill_refuses_a_merged_student_of_a_lora_fusion_before_touching_the_base():
    fused = lora_fusion(None)
    samples, hidden = data(2)
    with pytest.raises(ValueError, match="student='merged' needs full fine-tunes"):
        distill(fused, get_dummy_scheduler(), samples, encoder_hidden_states=hidden, progress_bar=False)
    assert "distilled" not in fused.unets[0].base.peft_config


def test_distill_with_a_one_process_accelerator_matches_plain_training():
    accelerate = pytest.importorskip("accelerate")
    samples, hidden = data()
    results = []
    for accelerator in (None, accelerate.Accelerator(cpu=True)):
        fused = FusedUNet([get_dummy_unet(0), get_dummy_unet(1)], weights=[0.6, 0.4])
        output = distill(fused, get_dummy_scheduler(), samples, encoder_hidden_states=hidden, accelerator=accelerator,
                         generator=torch.Generator().manual_seed(0), **dict(OPTIONS, max_steps=5))  # fmt: skip
        results.append((output.initial_validation_loss, output.validation_loss, output.best_step))
    assert results[0] == pytest.approx(results[1], rel=1e-6)
