"""Merged LoRAs: a baked LoRA in the stock pipeline gives the images of the stock pipeline with the k LoRAs loaded and
`set_adapters(..., adapter_weights=lambda)`; the Kohya file loads through Diffusers' Kohya reader; rank truncation."""

import copy
import json

import numpy as np
import pytest
import torch
from _bake_loras import FLUX_LORAS, save_lora_folders
from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from diffusers_scorefusion import FusedTransformer, FusedUNet
from diffusers_scorefusion.baking import merge_lora, save_merged_lora
from diffusers_scorefusion.fusion.merge_utils import lora_delta
from diffusers_scorefusion.testing.transformer_parts import get_dummy_flux_components
from diffusers_scorefusion.testing.unet_parts import get_dummy_unet, get_dummy_xl_components, get_dummy_xl_unet

WEIGHTS = [0.5, 0.2, 0.3]
SD_CALL = dict(prompt="a photo", num_inference_steps=2, guidance_scale=5.0, height=32, width=32, output_type="np")


def sd_components():
    from diffusers_scorefusion.testing.unet_parts import get_dummy_components

    components = get_dummy_components(num_members=1)
    components["unet"] = components["unet"].unets[0]
    return components


def images(pipe, call):
    return pipe(**call, generator=torch.Generator().manual_seed(0)).images


def with_k_loras(pipeline_class, components, denoiser, folders, weights=WEIGHTS):
    """The reference: the stock pipeline with the k LoRAs loaded and set_adapters(..., adapter_weights=lambda)."""
    pipe = pipeline_class(**{**components, denoiser: copy.deepcopy(components[denoiser])})
    for i, folder in enumerate(folders):
        pipe.load_lora_weights(folder, adapter_name=f"m{i}")
    pipe.set_adapters([f"m{i}" for i in range(len(folders))], adapter_weights=list(weights))
    return pipe


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_baked_lora_matches_stock_pipeline_with_the_k_loras(kind, tmp_path):
    components = sd_components() if kind == "sd" else get_dummy_xl_components(num_members=1)
    if kind == "sdxl":
        components["unet"] = components["unet"].unets[0]
    pipeline_class = StableDiffusionPipeline if kind == "sd" else StableDiffusionXLPipeline
    folders = save_lora_folders(components["unet"], tmp_path)
    fused = FusedUNet.from_lora(copy.deepcopy(components["unet"]), folders, weights=WEIGHTS)
    merged = merge_lora(fused)
    assert merged.rank == 2 + 4 + 3 and merged.relative_errors is None
    save_merged_lora(merged, tmp_path / "baked")
    record = json.loads((tmp_path / "baked" / "bake.json").read_text())
    assert record["weights"] == pytest.approx(WEIGHTS) and record["files"] == ["pytorch_lora_weights.safetensors"]

    expected = images(with_k_loras(pipeline_class, components, "unet", folders), SD_CALL)
    baked = pipeline_class(**{**components, "unet": copy.deepcopy(components["unet"])})
    baked.load_lora_weights(str(tmp_path / "baked"))
    actual = images(baked, SD_CALL)
    np.testing.assert_allclose(actual, expected, atol=2e-5)
    plain = images(pipeline_class(**components), SD_CALL)
    assert np.abs(plain - expected).max() > 1e-3  # the LoRAs change the images

    save_merged_lora(merged, tmp_path / "kohya", format="kohya")
    kohya = pipeline_class(**{**components, "unet": copy.deepcopy(components["unet"])})
    kohya.load_lora_weights(str(tmp_path / "kohya"), weight_name="lora_kohya.safetensors")
    np.testing.assert_allclose(images(kohya, SD_CALL), expected, atol=2e-5)


def test_baked_lora_matches_stock_flux_pipeline_with_the_k_loras(tmp_path):
    components = get_dummy_flux_components()
    folders = save_lora_folders(components["transformer"], tmp_path, specs=FLUX_LORAS)
    fused = FusedTransformer.from_lora(copy.deepcopy(components["transformer"]), folders, weights=WEIGHTS)
    save_merged_lora(merge_lora(fused), tmp_path / "baked")
    call = dict(prompt="a photo", num_inference_steps=2, guidance_scale=3.5, height=16, width=16, output_type="np",
                max_sequence_length=16)  # fmt: skip
    expected = images(with_k_loras(FluxPipeline, components, "transformer", folders), call)
    baked = FluxPipeline(**{**components, "transformer": copy.deepcopy(components["transformer"])})
    baked.load_lora_weights(str(tmp_path / "baked"))
    np.testing.assert_allclose(images(baked, call), expected, atol=2e-5)
    assert np.abs(images(FluxPipeline(**components), call) - expected).max() > 1e-3
    with pytest.raises(ValueError, match="Kohya format is written for UNet LoRAs"):
        save_merged_lora(merge_lora(fused), tmp_path / "kohya", format="kohya")
    assert not (tmp_path / "kohya").exists()


def test_rank_truncation_is_exact_at_full_rank_and_reports_errors(tmp_path):
    base = get_dummy_unet(0)
    folders = save_lora_folders(base, tmp_path)
    fused = FusedUNet.from_lora(copy.deepcopy(base), folders, weights=WEIGHTS)
    exact = merge_lora(fused)
    full = merge_lora(fused, rank=9)
    low = merge_lora(fused, rank=2)
    for name in full.relative_errors:
        delta = lora_delta(exact.state_dict[f"{name}.lora_A.weight"], exact.state_dict[f"{name}.lora_B.weight"])
        at_full = lora_delta(full.state_dict[f"{name}.lora_A.weight"], full.state_dict[f"{name}.lora_B.weight"])
        at_two = lora_delta(low.state_dict[f"{name}.lora_A.weight"], low.state_dict[f"{name}.lora_B.weight"])
        torch.testing.assert_close(at_full, delta, atol=1e-5, rtol=1e-4)
        assert full.relative_errors[name] < 1e-6
        error = float((at_two - delta).norm() / delta.norm())
        assert low.relative_errors[name] == pytest.approx(error, abs=1e-5)
        singular = torch.linalg.svdvals(delta.double().flatten(1))  # Eckart-Young: the tail of the spectrum
        assert error == pytest.approx(float(singular[2:].norm() / singular.norm()), abs=1e-5)
    assert max(low.relative_errors.values()) > 0.05  # rank 2 is a real truncation here
    save_merged_lora(low, tmp_path / "low")
    record = json.loads((tmp_path / "low" / "bake.json").read_text())
    assert record["rank"] == 2 and record["relative_errors"] == pytest.approx(low.relative_errors)


def test_one_hot_weights_give_that_member_exactly(tmp_path):
    base = get_dummy_xl_unet(0)
    folders = save_lora_folders(base, tmp_path)
    fused = FusedUNet.from_lora(copy.deepcopy(base), folders, weights=[0.0, 1.0, 0.0])
    merged = merge_lora(fused)
    member = fused.unets[1].base
    for name, module in member.named_modules():
        if hasattr(module, "lora_A") and "member_1" in module.lora_A:
            expected = module.get_delta_weight("member_1")
            actual = lora_delta(merged.state_dict[f"{name}.lora_A.weight"], merged.state_dict[f"{name}.lora_B.weight"])
            torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)


def test_flux_adapter_schedule_uses_the_transformers_timestep_units(tmp_path):
    """Flux's pipeline passes timestep / 1000: the schedule's bins must be read in those units, as the fusion's."""
    from diffusers_scorefusion.baking import bake_lora_schedule, load_lora_schedule, save_lora_schedule

    components = get_dummy_flux_components()
    base = components["transformer"]
    folders = save_lora_folders(base, tmp_path, specs=FLUX_LORAS)
    table, edges = [[0.6, 0.1, 0.3], [0.1, 0.7, 0.2]], [0.0, 0.6, 1.0]  # 4 steps: sigma 1, .75 | .5, .25
    fused = FusedTransformer.from_lora(copy.deepcopy(base), folders)
    fused.set_weights(table, timestep_bin_edges=edges)
    save_lora_schedule(bake_lora_schedule(fused), tmp_path / "baked")
    per_bin = []
    for row in table:
        model = copy.deepcopy(base)
        for i, folder in enumerate(folders):
            model.load_lora_adapter(folder, prefix="transformer", adapter_name=f"m{i}", use_safetensors=True)
        model.set_adapters(["m0", "m1", "m2"], weights=row)
        model.fuse_lora(adapter_names=["m0", "m1", "m2"])
        model.unload_lora()
        per_bin.append(model)
    counterpart = FusedTransformer(per_bin, weights=[[1.0, 0.0], [0.0, 1.0]], timestep_bin_edges=edges)
    call = dict(prompt="a photo", num_inference_steps=4, guidance_scale=3.5, height=16, width=16, output_type="np",
                max_sequence_length=16)  # fmt: skip
    expected = images(FluxPipeline(**{**components, "transformer": counterpart}), call)
    pipe = FluxPipeline(**{**components, "transformer": copy.deepcopy(base)})
    schedule = load_lora_schedule(pipe, tmp_path / "baked")
    assert schedule.config.timestep_scale == pytest.approx(1e-3)
    schedule.prepare(pipe, 4)
    np.testing.assert_allclose(images(pipe, {**call, "callback_on_step_end": schedule}), expected, atol=2e-5)
    schedule.prepare(pipe, 4)
    assert np.abs(images(pipe, call) - expected).max() > 1e-4


def test_merged_delta_is_the_weighted_sum_of_peft_deltas_with_rank_patterns(tmp_path):
    """Every layer: merged delta == sum_i lambda_i * PEFT's own get_delta_weight(adapter_i), for members whose rank
    varies by layer (rank_pattern) and that adapt different layers."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    base = get_dummy_unet(0)
    loras = []
    for seed, config in ((0, dict(r=2, lora_alpha=3, target_modules=["to_q", "to_k"], rank_pattern={"to_k": 5})),
                         (1, dict(r=4, lora_alpha=4, target_modules=["to_k", "conv1"], alpha_pattern={"conv1": 1}))):
        torch.manual_seed(seed)
        model = copy.deepcopy(base)
        model.add_adapter(LoraConfig(init_lora_weights=False, **config))
        stored = model.peft_config["default"].to_dict()
        metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in stored.items()}
        path = tmp_path / str(seed)
        StableDiffusionPipeline.save_lora_weights(str(path), unet_lora_layers=get_peft_model_state_dict(model),
                                                  unet_lora_adapter_metadata=metadata)  # fmt: skip
        loras.append(str(path))
    fused = FusedUNet.from_lora(copy.deepcopy(base), loras, weights=[0.4, 0.6])
    merged = merge_lora(fused)
    assert merged.rank == 5 + 4  # each member's widest rank
    shared = fused.unets[0].base
    checked = 0
    for name, module in shared.named_modules():
        if not hasattr(module, "get_delta_weight") or not any(a in module.lora_A for a in ("member_0", "member_1")):
            continue
        expected = sum(w * module.get_delta_weight(a) for w, a in ((0.4, "member_0"), (0.6, "member_1"))
                       if a in module.lora_A)  # fmt: skip
        actual = lora_delta(merged.state_dict[f"{name}.lora_A.weight"], merged.state_dict[f"{name}.lora_B.weight"])
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)
        checked += 1
    assert checked == len({key.rsplit(".lora_", 1)[0] for key in merged.state_dict}) > 0
