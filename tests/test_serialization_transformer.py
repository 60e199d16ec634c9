"""Saving and loading `FusedTransformer`s: both layouts, LoRA fusions, variants, `.bin`, placement, and SD3 / Flux
pipelines through `ScoreFusion*Pipeline.from_pretrained` and `DiffusionPipeline.from_pretrained`.

Weights that `from_pretrained` memory-maps can give other last bits in some CPU kernels than the same weights built in
memory (a stock `FluxPipeline` round trip shows it too; the weights are equal): round trips whose outputs are compared
with the in-memory model load with `disable_mmap=True`, which copies the weights as Diffusers reads them.
"""

import copy
import json
import os

import pytest
import torch
from _serialization_checks import check_variant_round_trip
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from test_modeling_fused_transformer import flux_inputs  # noqa: E402

from diffusers_scorefusion import (
    FusedTransformer,
    FusedUNet,
    LoraMember,
    ScoreFusionFluxPipeline,
    ScoreFusionSD3Pipeline,
)
from diffusers_scorefusion.testing import transformer_parts as parts

CALL = dict(prompt="a cat", height=8, width=8, max_sequence_length=16, num_inference_steps=2, output_type="pt")
FAMILIES = {
    "sd3": (ScoreFusionSD3Pipeline, parts.get_dummy_sd3_components, parts.get_dummy_sd3_transformer),
    "flux": (ScoreFusionFluxPipeline, parts.get_dummy_flux_components, parts.get_dummy_flux_transformer),
}


def _outputs(model, timestep=0.6):
    with torch.no_grad():
        return torch.cat([model(**flux_inputs(timestep=t))[0] for t in (0.2, timestep)])  # both timestep bins


def _same_tensors(first, second):
    mine, theirs = first.state_dict(), second.state_dict()
    return mine.keys() == theirs.keys() and all(torch.equal(mine[key], theirs[key]) for key in mine)


def _images(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(**CALL, generator=torch.Generator().manual_seed(0)).images


@pytest.fixture(scope="module")
def fused():
    model = FusedTransformer([parts.get_dummy_flux_transformer(0), parts.get_dummy_flux_transformer(1)],
                             member_schedulers=[FlowMatchEulerDiscreteScheduler()] * 2)  # fmt: skip
    model.set_weights([[0.25, 0.75], [1.0, 0.0]], timestep_bin_edges=[0.0, 0.5, 1.0], provenance={"method": "exact"})
    return model


def test_round_trip_is_bit_exact_and_members_are_standard_transformer_folders(fused, tmp_path):
    fused.save_pretrained(tmp_path / "fusion")
    assert sorted(os.listdir(tmp_path / "fusion")) == ["config.json", "member_0.diffusers", "member_1.diffusers"]
    config = json.loads((tmp_path / "fusion" / "config.json").read_text())
    assert config["_class_name"] == "FusedTransformer" and config["member_class"] == "FluxTransformer2DModel"
    assert config["noise_schedule"] == {"num_train_timesteps": 1000, "shift": 1.0}
    assert [member["class_name"] for member in config["members"]] == ["FluxTransformer2DModel"] * 2
    loaded = FusedTransformer.from_pretrained(tmp_path / "fusion", disable_mmap=True)
    assert dict(loaded.config) == dict(fused.config) and _same_tensors(loaded, fused)
    assert torch.equal(_outputs(loaded), _outputs(fused))
    member = FluxTransformer2DModel.from_pretrained(tmp_path / "fusion" / "member_1.diffusers")
    assert _same_tensors(member, fused.transformers[1])
    with pytest.raises(ValueError, match="is not a FusedUNet config .*load it with FusedTransformer.from_pretrained"):
        FusedUNet.from_pretrained(tmp_path / "fusion")


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_variants_and_bin_weights(fused, tmp_path, safe_serialization):
    check_variant_round_trip(fused, FusedTransformer, FluxTransformer2DModel, _same_tensors, tmp_path / "fusion",
                             safe_serialization)  # fmt: skip
    if not safe_serialization:  # .bin goes through torch's weights_only loader; allow_pickle=False reads none
        with pytest.raises(ValueError, match="only safetensors were read: allow_pickle=False"):
            FusedTransformer.from_pretrained(tmp_path / "fusion", allow_pickle=False)


def test_torch_dtype_and_device_map_per_member(fused, tmp_path):
    fused.save_pretrained(tmp_path / "fusion")
    loaded = FusedTransformer.from_pretrained(tmp_path / "fusion", torch_dtype=torch.bfloat16,
                                              device_map=["cpu", "cpu"])  # fmt: skip
    assert loaded.dtype == torch.bfloat16 and all(member.dtype == torch.bfloat16 for member in loaded.transformers)
    with pytest.raises(ValueError, match="device_map as a list must hold 2 entries"):
        FusedTransformer.from_pretrained(tmp_path / "fusion", device_map=["cpu"])


def test_reference_only_layout_and_push_to_hub(tmp_path, monkeypatch):
    components = parts.get_dummy_flux_components(0)
    FluxPipeline(**components).save_pretrained(tmp_path / "base")
    parts.get_dummy_flux_transformer(1).save_pretrained(tmp_path / "member_a")
    FluxPipeline(**{**components, "transformer": parts.get_dummy_flux_transformer(2)}).save_pretrained(tmp_path / "b")
    members = [tmp_path / "member_a", tmp_path / "b"]  # a transformer folder, a pipeline folder
    dtypes = {"transformer": torch.bfloat16, "default": torch.float32}  # Diffusers' per-component torch_dtype
    pipe = ScoreFusionFluxPipeline.from_pretrained(tmp_path / "base", transformers=members, torch_dtype=dtypes)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.float32
    pipe = ScoreFusionFluxPipeline.from_pretrained(tmp_path / "base", transformers=members, weights=[0.3, 0.7])
    pipe.transformer.save_pretrained(tmp_path / "ref", reference_only=True)
    assert os.listdir(tmp_path / "ref") == ["config.json"]
    loaded = FusedTransformer.from_pretrained(tmp_path / "ref")
    assert loaded.member_sources == pipe.transformer.member_sources
    assert dict(loaded.config) == dict(pipe.transformer.config) and _same_tensors(loaded, pipe.transformer)
    assert torch.equal(_outputs(loaded), _outputs(pipe.transformer))

    import huggingface_hub

    uploaded = {}
    repo = type("Repo", (), {"repo_id": "someone/flux-fusion"})
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kwargs: repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda repo_id, folder_path, commit_message, **kwargs:
                        uploaded.update(files=sorted(os.listdir(folder_path)), message=commit_message))  # fmt: skip
    assert pipe.transformer.push_to_hub("someone/flux-fusion", reference_only=True) == "someone/flux-fusion"
    assert uploaded == {"files": ["config.json"], "message": "Upload FusedTransformer"}


def test_lora_fusion_saves_the_base_once_and_one_lora_folder_per_member(tmp_path):
    pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict
    from test_lora_transformer import random_lora

    base = parts.get_dummy_flux_transformer(0)
    loras = [{f"transformer.{key}": value for key, value in get_peft_model_state_dict(random_lora(base, seed)).items()}
             for seed in (1, 2)]  # fmt: skip
    fused = FusedTransformer.from_lora(copy.deepcopy(base), loras, weights=[0.3, 0.7],
                                       member_schedulers=[FlowMatchEulerDiscreteScheduler()] * 2)  # fmt: skip
    fused.save_pretrained(tmp_path / "fusion", variant="fp16", safe_serialization=False)
    assert sorted(os.listdir(tmp_path / "fusion")) == [
        "config.json", "lora_base_0.fp16.diffusers", "member_0.fp16.diffusers", "member_1.fp16.diffusers"]  # fmt: skip
    assert os.listdir(tmp_path / "fusion" / "member_0.fp16.diffusers") == ["pytorch_lora_weights.safetensors"]
    saved_base = FluxTransformer2DModel.from_pretrained(tmp_path / "fusion" / "lora_base_0.fp16.diffusers",
                                                        variant="fp16")  # the plain base, adapters removed
    assert _same_tensors(saved_base, base)
    loaded = FusedTransformer.from_pretrained(tmp_path / "fusion", disable_mmap=True)
    assert all(isinstance(member, LoraMember) for member in loaded.transformers)
    assert loaded.transformers[0].base is loaded.transformers[1].base  # still one base in memory
    assert dict(loaded.config) == dict(fused.config) and torch.equal(_outputs(loaded), _outputs(fused))
    with pytest.raises(ValueError, match="reference_only=True is not supported for LoRA members"):
        fused.save_pretrained(tmp_path / "ref", reference_only=True)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_pipeline_round_trip_through_both_loaders(family, tmp_path):
    fusion_class, build, build_member = FAMILIES[family]
    components = build(0)
    fused = FusedTransformer([components["transformer"], build_member(1)], weights=[0.3, 0.7],
                             member_schedulers=[components["scheduler"]] * 2)  # fmt: skip
    pipe = fusion_class(**{**components, "transformer": fused})
    expected = _images(pipe)
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers_scorefusion.models.modeling_fused_transformer", "FusedTransformer"]
    for loader in (fusion_class, DiffusionPipeline):
        loaded = loader.from_pretrained(tmp_path / "pipe", disable_mmap=True)
        assert type(loaded) is fusion_class and isinstance(loaded.transformer, FusedTransformer)
        assert dict(loaded.transformer.config) == dict(fused.config) and torch.equal(_images(loaded), expected)
    # saved again over itself, as fp16-named .bin files; Diffusers' variant scan reads transformer/ too
    pipe.save_pretrained(tmp_path / "pipe", variant="fp16", safe_serialization=False)
    assert sorted(os.listdir(tmp_path / "pipe" / "transformer")) == ["config.json", "member_0.fp16.diffusers",
                                                                     "member_1.fp16.diffusers"]  # fmt: skip
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe", variant="fp16", disable_mmap=True)
    assert torch.equal(_images(loaded), expected)


def test_a_stock_flux_pipeline_saves_and_loads_its_fused_transformer(tmp_path):
    components = parts.get_dummy_flux_components(0)
    fused = FusedTransformer([components["transformer"], parts.get_dummy_flux_transformer(1)], weights=[0.6, 0.4])
    pipe = FluxPipeline(**{**components, "transformer": fused})
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = FluxPipeline.from_pretrained(tmp_path / "pipe", disable_mmap=True)
    assert isinstance(loaded.transformer, FusedTransformer) and torch.equal(_images(loaded), _images(pipe))


def _to_hub_cache(folder, repo_id):
    """Puts a local folder into the Hugging Face cache as `repo_id` (what a download leaves there; tests are
    offline)."""
    import shutil

    from huggingface_hub import constants

    repo = os.path.join(constants.HF_HUB_CACHE, "models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, os.path.join(repo, "snapshots", "0" * 40))
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as handle:
        handle.write("0" * 40)


def test_hub_repo_ids_load_as_local_folders_do(fused, tmp_path):
    fused.save_pretrained(tmp_path / "fusion")
    _to_hub_cache(tmp_path / "fusion", "someone/flux-fusion")
    assert _same_tensors(FusedTransformer.from_pretrained("someone/flux-fusion"), fused)  # sha256 checked there too
    # reference-only on the Hub: members are Hub repos, a transformer repo and a pipeline repo (its transformer/)
    components = parts.get_dummy_flux_components(0)
    fused.transformers[0].save_pretrained(tmp_path / "a")
    FluxPipeline(**{**components, "transformer": fused.transformers[1]}).save_pretrained(tmp_path / "b")
    _to_hub_cache(tmp_path / "a", "someone/flux-a")
    _to_hub_cache(tmp_path / "b", "someone/flux-b")
    sources = [{"pretrained_model_name_or_path": f"someone/flux-{name}"} for name in "ab"]
    fused.save_pretrained(tmp_path / "ref", reference_only=True, member_sources=sources)
    _to_hub_cache(tmp_path / "ref", "someone/flux-ref")
    loaded = FusedTransformer.from_pretrained("someone/flux-ref")
    assert _same_tensors(loaded, fused)
    assert loaded.member_sources[1]["pretrained_model_name_or_path"] == "someone/flux-b"
