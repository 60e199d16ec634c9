"""Bad input, one row per case (issue 11): each is refused with a ValueError/TypeError/OSError whose message names
the value and what was expected, and refusing it changes nothing (the fusion's weights and config, and every file).

Rows marked "existing" restate cases other test modules already check. Forms that are accepted (uint8 images, RGBA
PIL images, mixed sizes with height/width) are checked at the end. The command line's rows are in
`test_bad_inputs_cli.py`.
"""

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import PIL.Image
import pytest
import safetensors.torch
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

from diffusers_scorefusion import FusedTransformer, FusedUNet, ScoreFusionPipeline, fit_weights
from diffusers_scorefusion.fitting import encode_for_fitting
from diffusers_scorefusion.loaders.atomic_save import JOURNAL_NAME
from diffusers_scorefusion.testing.transformer_parts import get_dummy_flux_transformer
from diffusers_scorefusion.testing.unet_parts import get_dummy_components, get_dummy_unet

MEMBER = "member_1.diffusers"
WEIGHTS = "diffusion_pytorch_model.safetensors"


class Env:
    """A fusion, a transformer fusion and a pipeline in memory; each fusion saved self-contained and reference-only
    in `root`."""

    def __init__(self, root, fused, pipe, tfused):
        self.root, self.fused, self.pipe, self.tfused = root, fused, pipe, tfused
        self.saved, self.ref = root / "fusion", root / "ref"
        self.tsaved, self.tref = root / "tfusion", root / "tref"

    def edit(self, change: Callable[[dict], Any], folder=None) -> None:
        path = (folder or self.saved) / "config.json"
        config = json.loads(path.read_text())
        change(config)
        path.write_text(json.dumps(config))

    def snapshot(self):
        files = {}
        for folder, _, names in os.walk(self.root):
            for name in names:
                path = os.path.join(folder, name)
                with open(path, "rb") as handle:
                    files[os.path.relpath(path, self.root)] = hashlib.sha256(handle.read()).hexdigest()
        models = [(json.dumps(dict(model.config), sort_keys=True, default=str), model.fusion_weights.tolist(),
                   [param.sum().item() for param in model.parameters()])
                  for model in (self.fused, self.pipe.unet, self.tfused)]  # fmt: skip
        return files, models


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    fused = FusedUNet([get_dummy_unet(0), get_dummy_unet(1)], weights=[0.3, 0.7],
                      member_schedulers=[DDIMScheduler(), DDIMScheduler()])  # fmt: skip
    fused.save_pretrained(root / "fusion")
    sources = []
    for i, unet in enumerate(fused.unets):
        unet.save_pretrained(root / f"unet_{i}")
        sources.append({"pretrained_model_name_or_path": str(root / f"unet_{i}")})
    fused.save_pretrained(root / "ref", reference_only=True, member_sources=sources)
    pipe = ScoreFusionPipeline(**get_dummy_components(weights=[0.5, 0.5]))
    pipe.set_progress_bar_config(disable=True)
    tfused = FusedTransformer([get_dummy_flux_transformer(0), get_dummy_flux_transformer(1)], weights=[0.3, 0.7],
                              member_schedulers=[FlowMatchEulerDiscreteScheduler()] * 2)  # fmt: skip
    tfused.save_pretrained(root / "tfusion")
    for i, transformer in enumerate(tfused.transformers):
        transformer.save_pretrained(root / f"flux_{i}")
    sources = [{"pretrained_model_name_or_path": str(root / f"flux_{i}")} for i in (0, 1)]
    tfused.save_pretrained(root / "tref", reference_only=True, member_sources=sources)
    return root, fused, pipe, tfused


@pytest.fixture
def env(pristine, tmp_path):
    root, fused, pipe, tfused = pristine
    shutil.copytree(root, tmp_path / "root")
    return Env(tmp_path / "root", fused, pipe, tfused)


@dataclass
class Case:
    name: str
    action: Callable[[Env], Callable[[], Any]]  # prepares the bad input; returns the call that must refuse it
    error: type
    match: str


def _load(folder_of, loader=FusedUNet, **kwargs):
    return lambda env: lambda: loader.from_pretrained(folder_of(env), **kwargs)


def _tampered(change, folder=lambda env: env.saved, loader=FusedUNet, **kwargs):
    def action(env):
        env.edit(change, folder(env))
        return lambda: loader.from_pretrained(folder(env), **kwargs)

    return action


def _tampered_transformer(change, folder=lambda env: env.tsaved, **kwargs):
    return _tampered(change, folder, FusedTransformer, **kwargs)


def _member(index, **changes):
    return lambda config: config["members"][index].update(changes)


def _rewrite_member(env, change, folder=None):
    path = (folder or env.saved) / MEMBER / WEIGHTS
    tensors = safetensors.torch.load_file(path)
    change(tensors)
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})


def _missing_tensor(env):
    _rewrite_member(env, lambda tensors: tensors.pop("conv_norm_out.weight"))
    return lambda: FusedUNet.from_pretrained(env.saved, verify_weights=False)


def _unexpected_tensor(env):
    _rewrite_member(env, lambda tensors: tensors.update({"extra.weight": torch.zeros(2)}))
    return lambda: FusedUNet.from_pretrained(env.saved, verify_weights=False)


def _missing_transformer_tensor(env):
    _rewrite_member(env, lambda tensors: tensors.pop("proj_out.weight"), env.tsaved)
    return lambda: FusedTransformer.from_pretrained(env.tsaved, verify_weights=False)


def _flipped_byte(env):
    path = env.saved / MEMBER / WEIGHTS
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x10  # inside the last tensor's data: still a valid file, other weights
    path.write_bytes(bytes(data))
    return lambda: FusedUNet.from_pretrained(env.saved)


def _extra_weight_file(env):
    (env.saved / MEMBER / "diffusion_pytorch_model.bin").write_bytes(b"not recorded")
    return lambda: FusedUNet.from_pretrained(env.saved)


class Payload:
    def __reduce__(self):  # unpickling would create the marker file
        return (os.makedirs, (os.path.join(os.environ.get("SCOREFUSION_TEST_MARKER", "/nonexistent"), "ran"),))


def _pickle_with_code(env, folder=None, loader=FusedUNet):
    member = (folder or env.saved) / MEMBER
    tensors = safetensors.torch.load_file(member / WEIGHTS)
    os.remove(member / WEIGHTS)
    torch.save({**tensors, "payload": Payload()}, member / "diffusion_pytorch_model.bin")
    os.environ["SCOREFUSION_TEST_MARKER"] = str(env.root.parent)
    return lambda: loader.from_pretrained(folder or env.saved, verify_weights=False)


def _planted_journal(env):
    """A journal that no save wrote (e.g. unpacked from an archive) naming a file of the user's."""
    (env.saved / "train.py").write_text("mine")
    (env.saved / ".scorefusion-saving-x").mkdir()
    (env.saved / JOURNAL_NAME).write_text(json.dumps({
        "kind": "FusedUNet save", "staging": ".scorefusion-saving-x", "backup": ".scorefusion-old-x",
        "commit": "config.json", "old": ["config.json", "train.py"], "new": ["config.json"]}))  # fmt: skip
    return lambda: FusedUNet.from_pretrained(env.saved)


def _deleted_member(env):
    shutil.rmtree(env.saved / MEMBER)
    return lambda: FusedUNet.from_pretrained(env.saved)


def _fit(images, **kwargs):
    return lambda env: lambda: env.pipe.fit_weights(images, "a photo", num_noise_draws=1, num_bootstrap=0, **kwargs)


def _with_schedule(**overrides):
    return lambda env: lambda: FusedUNet([get_dummy_unet(0)], member_schedulers=[DDPMScheduler(**overrides)])


def _nan_schedule(env):
    scheduler = DDPMScheduler()
    scheduler.register_to_config(trained_betas=[float("nan")] * 1000)
    return lambda: FusedUNet([get_dummy_unet(0)], member_schedulers=[scheduler])


def _save_into(make_folder, save=lambda env, folder: env.fused.save_pretrained(folder)):
    def action(env):
        folder = make_folder(env)
        return lambda: save(env, folder)

    return action


def _foreign_unet_folder(env):
    get_dummy_unet(0).save_pretrained(env.root / "someone_elses_unet")
    return env.root / "someone_elses_unet"


def _folder_with(name):
    def make(env):
        (env.root / "mine" / name).mkdir(parents=True)
        return env.root / "mine"

    return make


def _stock_pipeline_folder(env):
    folder = env.root / "stock"
    folder.mkdir()
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]})
    )
    return folder


def _subclass_member(env):
    class MyFlux(FluxTransformer2DModel):  # a class loading would have to import from somewhere other than Diffusers
        pass

    fused = FusedTransformer([MyFlux(**get_dummy_flux_transformer(0).config)])
    return lambda: fused.save_pretrained(env.root / "new")


def _stock_transformer_folder(env):
    get_dummy_flux_transformer(0).save_pretrained(env.root / "someone_elses_transformer")
    return env.root / "someone_elses_transformer"


def _unet_as_transformer(env):
    def change(config):  # member 0 names a UNet folder, member 1 its own folder (both inside the copied root)
        for i, name in enumerate(("unet_0", "flux_1")):
            config["members"][i]["pretrained_model_name_or_path"] = str(env.root / name)

    return _tampered_transformer(change, lambda env: env.tref)(env)


def _transformer_members(**changes):
    return lambda config: [member.update(changes) for member in config["members"]]


def _bad_lora(tensors):
    def action(env):
        return lambda: FusedUNet.from_lora(get_dummy_unet(0), [tensors])

    return action


LORA_KEY = "unet.down_blocks.1.attentions.0.proj_in.lora_{}.weight"

CASES = [
    # ---- saving: never delete what the save did not write; refuse before writing
    Case("save over a folder holding another model's config.json", _save_into(_foreign_unet_folder),
         FileExistsError, "is not from a FusedUNet save"),
    Case("save over a folder holding a member folder it did not write", _save_into(_folder_with("member_0.diffusers")),
         FileExistsError, r"already holds \['member_0.diffusers'\], which the previous FusedUNet save did not write"),
    Case("save to a path that is a file", _save_into(lambda env: env.saved / "config.json"), FileExistsError,
         "is not a folder"),
    Case("pipeline save over a stock pipeline's folder", _save_into(_stock_pipeline_folder,
         lambda env, folder: env.pipe.save_pretrained(folder)), FileExistsError,
         "is not from a ScoreFusion pipeline save"),
    Case("save with a variant that is not a name", _save_into(lambda env: env.root / "new",
         lambda env, folder: env.fused.save_pretrained(folder, variant="../fp16")), ValueError, "variant must be"),
    Case("save with safe_serialization that is not a bool", _save_into(lambda env: env.root / "new",
         lambda env, folder: env.fused.save_pretrained(folder, safe_serialization="no")), TypeError,
         "safe_serialization"),
    # ---- weights
    Case("set_weights with booleans", lambda env: lambda: env.fused.set_weights([True, False]), TypeError,
         "weights must be real numbers"),
    Case("set_weights not summing to 1 (existing)", lambda env: lambda: env.fused.set_weights([0.5, 0.6]), ValueError,
         "must sum to 1"),
    Case("set_weights negative (existing)", lambda env: lambda: env.fused.set_weights([-0.5, 1.5]), ValueError,
         "must be >= 0"),
    Case("set_weights NaN (existing)", lambda env: lambda: env.fused.set_weights([float("nan"), 1.0]), ValueError,
         "must be finite"),
    Case("fusion_weights per call with booleans", lambda env: lambda: env.pipe("a cat", num_inference_steps=1,
         fusion_weights=torch.tensor([True, False])), TypeError, "fusion_weights must be real numbers"),
    # ---- noise schedules
    Case("member schedule with NaN trained_betas", _nan_schedule, ValueError, "betas must be finite and in"),
    Case("member schedule with betas > 1", _with_schedule(trained_betas=[1.5] * 1000), ValueError,
         r"betas must be finite and in \(0, 1\), got 1.5"),
    Case("member schedule whose trained_betas length differs", _with_schedule(trained_betas=[0.01] * 10), ValueError,
         "trained_betas has 10 entries but num_train_timesteps is 1000"),
    Case("member schedule with no timestep", _with_schedule(num_train_timesteps=0), ValueError,
         "num_train_timesteps must be an int >= 1, got 0"),
    Case("saved noise_schedule with NaN betas", _tampered(lambda c: c["noise_schedule"].update(
         trained_betas=[float("nan")] * 1000)), ValueError, "noise_schedule: betas must be finite"),
    # ---- weights that load wrong
    Case("member file missing a tensor", _missing_tensor, ValueError, r"lacks tensors \['conv_norm_out.weight'\]"),
    Case("member file with an unexpected tensor", _unexpected_tensor, ValueError,
         r"holds unexpected tensors \['extra.weight'\]"),
    Case("flipped byte in a member's tensor data", _flipped_byte, ValueError,
         f"{WEIGHTS} does not match the sha256 recorded"),
    Case("a weight file the save did not record", _extra_weight_file, ValueError,
         r"holds weight files the save did not record: \['diffusion_pytorch_model.bin'\]"),
    Case("a .bin file that only full unpickling could read", _pickle_with_code, OSError,
         "holds Python objects other than tensors"),
    Case("truncated member weights (existing)", lambda env: (
         (env.saved / MEMBER / WEIGHTS).write_bytes(b"\0" * 16), _load(lambda e: e.saved)(env))[1], ValueError,
         "does not match the sha256"),
    Case("deleted member folder", _deleted_member, ValueError, f"its folder '{MEMBER}' is missing"),
    Case("a planted save journal naming the user's file", _planted_journal, OSError,
         "names entries that its save did not write"),
    # ---- tampered configs
    Case("member class os.system", _tampered(_member(0, class_name="os.system")), ValueError,
         "records class 'os.system'"),
    Case("member class that differs from its folder's", _tampered(_member(0, class_name="UNet2DModel")), ValueError,
         "member 0 is recorded as a UNet2DModel but its folder holds a UNet2DConditionModel"),
    Case("member class StableDiffusionPipeline", _tampered(_member(1, class_name="StableDiffusionPipeline")),
         ValueError, "records class 'StableDiffusionPipeline'"),
    Case("member subfolder with ..", _tampered(_member(0, subfolder="../elsewhere")), ValueError,
         "must be a plain folder name inside the fusion folder, got '../elsewhere'"),
    Case("member subfolder absolute", _tampered(_member(0, subfolder="/etc")), ValueError, "plain folder name"),
    Case("reference-only subfolder with ..", _tampered(_member(0, subfolder="../../x"), lambda env: env.ref),
         ValueError, "relative path without '..'"),
    Case("reference-only member outside the folder's parent", _tampered(
         _member(0, pretrained_model_name_or_path="/"), lambda env: env.ref), ValueError,
         "outside .*allow_outside_paths"),
    Case("reference-only member that is neither a path nor a repo id", _tampered(
         _member(0, pretrained_model_name_or_path="no such:repo"), lambda env: env.ref), ValueError,
         "neither an existing local path nor a Hub repo id"),
    Case("text encoder subfolder with ..", _tampered(lambda c: c.update(
         text_encoders=[{"class_name": "CLIPTextModel", "subfolder": "../te"}], member_encoder_slots=[0, 1])),
         ValueError, r"text_encoders\[0\]: subfolder must be a plain folder name"),
    Case("text encoder of another class", _tampered(lambda c: c.update(
         text_encoders=[{"class_name": "AutoModel", "subfolder": "te"}], member_encoder_slots=[0, 1])),
         ValueError, "records class 'AutoModel'"),
    Case("unknown key in a text encoder entry", _tampered(lambda c: c.update(
         text_encoders=[{"class_name": "CLIPTextModel", "subfolder": "te", "code": "x"}], member_encoder_slots=[0, 1])),
         ValueError, r"unknown keys \['code'\]"),
    Case("member_encoder_slots out of range", _tampered(lambda c: c.update(
         text_encoders=[{"class_name": "CLIPTextModel", "subfolder": "te"}], member_encoder_slots=[0, 5])),
         ValueError, "member_encoder_slots must use each of the 1 text encoders"),
    Case("member_encoder_slots missing with text encoders", _tampered(lambda c: c.update(
         text_encoders=[{"class_name": "CLIPTextModel", "subfolder": "te"}])), ValueError, "no member_encoder_slots"),
    Case("unknown key in a LoRA member entry", _tampered(_member(0, class_name="LoraMember",
         lora={"base": 0, "hook": 1})), ValueError, r"lora has unknown keys \['hook'\]"),
    Case("unknown key in the noise schedule", _tampered(lambda c: c["noise_schedule"].update(shift=2)), ValueError,
         r"noise_schedule has unknown keys \['shift'\]"),
    Case("revision that is a number", _tampered(_member(0, revision=5)), ValueError,
         r"members\[0\]: revision must be str or null, got int 5"),
    Case("subfolder that is a number", _tampered(_member(0, subfolder=5)), ValueError,
         r"members\[0\]: subfolder must be str or null, got int 5"),
    Case("config that is a JSON list", lambda env: ((env.saved / "config.json").write_text("[1, 2]"),
         _load(lambda e: e.saved)(env))[1], ValueError, "must be a JSON object, got a JSON list"),
    Case("weights not summing to 1 (existing)", _tampered(lambda c: c.update(weights=[0.5, 0.6])), ValueError,
         "must sum to 1"),
    Case("num_members as a string (existing)", _tampered(lambda c: c.update(num_members="2")), ValueError,
         "num_members must be int"),
    Case("unknown top-level key (existing)", _tampered(lambda c: c.update(surprise=1)), ValueError,
         r"unknown keys \['surprise'\]"),
    Case("prediction type that is not Diffusers' (existing)", _tampered(lambda c: c.update(prediction_type="noise")),
         ValueError, "prediction_type must be one of"),
    Case("not a FusedUNet config (existing)", _tampered(lambda c: c.update(_class_name="UNet2DConditionModel")),
         ValueError, "is not a FusedUNet config"),
    Case("loading with another variant than saved", _load(lambda env: env.saved, variant="fp16"), ValueError,
         "was saved with variant None; got variant='fp16'"),
    Case("allow_pickle=False with use_safetensors=False", _load(lambda env: env.saved, allow_pickle=False,
         use_safetensors=False), ValueError, "contradicts"),
    Case("unknown load keyword (existing)", _load(lambda env: env.saved, weights_only=False), TypeError,
         "unexpected keyword arguments"),
    # ---- FusedTransformer folders: the same schema, with member_class and a flow schedule
    Case("transformer member class os.system", _tampered_transformer(_member(0, class_name="os.system")), ValueError,
         "records class 'os.system'; expected one of \\('FluxTransformer2DModel', 'LoraMember'\\)"),
    Case("transformer member recorded as a UNet", _tampered_transformer(_member(
         1, class_name="UNet2DConditionModel")), ValueError,
         "records class 'UNet2DConditionModel'; expected one of \\('FluxTransformer2DModel'"),
    Case("member_class that is not a Diffusers transformer", _tampered_transformer(lambda c: c.update(
         member_class="StableDiffusionPipeline")), ValueError,
         "member_class 'StableDiffusionPipeline' is not a Diffusers transformer model"),
    Case("member_class that is a UNet", _tampered_transformer(lambda c: c.update(
         member_class="UNet2DConditionModel")), ValueError,
         "member_class 'UNet2DConditionModel' is not a Diffusers transformer model"),
    Case("member_class os.system", _tampered_transformer(lambda c: c.update(member_class="os.system")), ValueError,
         "member_class 'os.system' is not a Diffusers transformer model"),
    Case("member_class other than the members'", _tampered_transformer(lambda c: c.update(
         member_class="SD3Transformer2DModel")), ValueError,
         "records class 'FluxTransformer2DModel'; expected one of \\('SD3Transformer2DModel', 'LoraMember'\\)"),
    Case("transformer class that differs from its folder's", _tampered_transformer(lambda c: (c.update(
         member_class="SD3Transformer2DModel"), _transformer_members(class_name="SD3Transformer2DModel")(c))),
         ValueError, "is a 'FluxTransformer2DModel'; expected a SD3Transformer2DModel"),
    Case("reference-only transformer member that is a UNet", _unet_as_transformer, ValueError,
         "is a 'UNet2DConditionModel'; expected a FluxTransformer2DModel"),
    Case("reference-only transformer member outside the folder's parent", _tampered_transformer(
         _member(1, pretrained_model_name_or_path="/"), lambda env: env.tref), ValueError,
         "outside .*allow_outside"),
    Case("flow schedule with a DDPM key", _tampered_transformer(lambda c: c["noise_schedule"].update(
         beta_start=0.1)), ValueError, r"noise_schedule has unknown keys \['beta_start'\]"),
    Case("flow schedule with shift 0", _tampered_transformer(lambda c: c["noise_schedule"].update(shift=0)),
         ValueError, "noise_schedule: .*shift must be a finite number > 0, got 0"),
    Case("flow schedule with num_train_timesteps as a string", _tampered_transformer(lambda c: c["noise_schedule"]
         .update(num_train_timesteps="1000")), ValueError, "num_train_timesteps must be int, got str '1000'"),
    Case("text encoders in a FusedTransformer config", _tampered_transformer(lambda c: c.update(text_encoders=[])),
         ValueError, r"unknown keys \['text_encoders'\]"),
    Case("prediction_type in a FusedTransformer config", _tampered_transformer(lambda c: c.update(
         prediction_type="epsilon")), ValueError, r"unknown keys \['prediction_type'\]"),
    Case("a FusedTransformer folder loaded as a FusedUNet", _load(lambda env: env.tsaved), ValueError,
         "is not a FusedUNet config \\(_class_name='FusedTransformer'\\); load it with FusedTransformer"),
    Case("a FusedUNet folder loaded as a FusedTransformer", _load(lambda env: env.saved, FusedTransformer),
         ValueError,
         "is not a FusedTransformer config \\(_class_name='FusedUNet'\\); load it with FusedUNet.from_pretrained"),
    Case("transformer member file missing a tensor", _missing_transformer_tensor, ValueError,
         r"lacks tensors \['proj_out.weight'\]"),
    Case("a transformer .bin that only full unpickling could read", lambda env: _pickle_with_code(
         env, env.tsaved, FusedTransformer), OSError, "holds Python objects other than tensors"),
    Case("transformer load with another variant than saved", _load(lambda env: env.tsaved, FusedTransformer,
         variant="fp16"), ValueError, "was saved with variant None; got variant='fp16'"),
    Case("unknown transformer load keyword", _load(lambda env: env.tsaved, FusedTransformer, weights_only=False),
         TypeError, r"FusedTransformer.from_pretrained got unexpected keyword arguments \['weights_only'\]"),
    Case("saving a member of a subclass of a Diffusers transformer", _subclass_member, TypeError,
         "member 0 is a MyFlux; a FusedTransformer folder can only hold Diffusers transformer models"),
    Case("transformer save over a stock transformer's folder", _save_into(_stock_transformer_folder,
         lambda env, folder: env.tfused.save_pretrained(folder)), FileExistsError,
         "is not from a FusedTransformer save"),
    # ---- fitting inputs
    Case("float tensor images in [0, 255]", _fit(torch.rand(2, 3, 32, 32) * 255), ValueError,
         r"values in \[.*\]; float images must be in \[0, 1\]"),
    Case("float array images in [0, 255]", _fit(np.random.rand(2, 32, 32, 3) * 255), ValueError,
         "float images must be in"),
    Case("13-pixel image", _fit([PIL.Image.new("RGB", (13, 13))]), ValueError,
         "image size 13x13 is not a multiple of the VAE factor"),
    Case("height not a multiple of the VAE factor", _fit([PIL.Image.new("RGB", (32, 32))], height=13, width=32),
         ValueError, "height must be a positive multiple of"),
    Case("RGBA array", _fit(np.zeros((32, 32, 4), dtype=np.uint8)), ValueError,
         r"shape \(32, 32, 4\); arrays must be RGB"),
    Case("grey tensor", _fit(torch.zeros(1, 1, 32, 32)), ValueError, "tensors must be RGB"),
    Case("empty tensor batch", _fit(torch.zeros(0, 3, 32, 32)), ValueError, "is empty"),
    Case("images with NaN (existing)", _fit(torch.full((1, 3, 32, 32), float("nan"))), ValueError, "NaN or inf"),
    Case("16-bit integer array", _fit(np.zeros((32, 32, 3), dtype=np.uint16)), TypeError, "dtype uint16"),
    Case("mixed sizes without height/width", _fit([PIL.Image.new("RGB", (32, 32)), PIL.Image.new("RGB", (16, 32))]),
         ValueError, "same size .*pass height= and width="),
    Case("16-bit PIL image", _fit([PIL.Image.new("I;16", (32, 32))]), ValueError, "PIL mode 'I;16'"),
    Case("conditioning of the wrong width", lambda env: lambda: fit_weights(env.fused, DDIMScheduler(),
         torch.randn(2, 4, 16, 16), torch.randn(2, 7, 16), num_bootstrap=0, progress_bar=False), ValueError,
         "encoder_hidden_states have width 16 .*cross_attention_dim=32"),
    Case("scheduler given as a string", lambda env: lambda: fit_weights(env.fused, "DDIMScheduler",
         torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)), TypeError, "noise_scheduler must be a Diffusers scheduler"),
    # ---- LoRA members
    Case("1-D lora_A", _bad_lora({LORA_KEY.format("A"): torch.zeros(4), LORA_KEY.format("B"): torch.zeros(64, 4)}),
         ValueError, r"has shape \(4,\); lora_A and lora_B weights must be matrices"),
    Case("lora_A without its lora_B", _bad_lora({LORA_KEY.format("A"): torch.zeros(4, 64)}), ValueError,
         "lacks the lora_A or lora_B half"),
    Case("integer LoRA tensors", _bad_lora({LORA_KEY.format("A"): torch.zeros(4, 64, dtype=torch.int64),
                                            LORA_KEY.format("B"): torch.zeros(64, 4, dtype=torch.int64)}),
         TypeError, "not floating point"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_refused_and_changes_nothing(case, env):
    if case.name.startswith(("1-D lora", "lora_A without", "integer LoRA")):
        pytest.importorskip("peft")
    call = case.action(env)
    before = env.snapshot()
    with pytest.raises(case.error, match=case.match):
        call()
    assert env.snapshot() == before
    assert not (env.root.parent / "ran").exists()  # no pickled code ever ran


def test_allow_outside_paths_loads_what_it_refused(env):
    env.edit(_member(0, pretrained_model_name_or_path=str(env.root / "unet_0")), env.ref)
    shutil.move(env.root / "unet_0", env.root.parent / "unet_0")
    env.edit(_member(0, pretrained_model_name_or_path=str(env.root.parent / "unet_0")), env.ref)
    with pytest.raises(ValueError, match="outside"):
        FusedUNet.from_pretrained(env.ref)
    loaded = FusedUNet.from_pretrained(env.ref, allow_outside_paths=True)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), env.fused.state_dict().values()))


def test_accepted_image_forms_follow_the_image_processor_conventions(pristine):
    _, _, pipe, _ = pristine
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)

    def encode(images, prompts, **kwargs):
        return encode_for_fitting(pipe, images, prompts, **kwargs)

    reference, _ = encode([PIL.Image.fromarray(image) for image in pixels], "a photo")
    for form in (pixels, torch.from_numpy(pixels).permute(0, 3, 1, 2), pixels.astype(np.float32) / 255,
                 torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1):  # fmt: skip
        latents, _ = encode(form, "a photo")
        assert torch.allclose(latents, reference, atol=1e-5)
    rgba = [
        PIL.Image.fromarray(np.concatenate([image, np.full((32, 32, 1), 7, np.uint8)], -1), "RGBA") for image in pixels
    ]
    assert torch.equal(encode(rgba, "a photo")[0], reference)  # alpha dropped, as PIL's convert("RGB")
    grey = PIL.Image.fromarray(pixels[0, :, :, 0])
    assert torch.equal(encode([grey], "a photo")[0], encode([grey.convert("RGB")], "a photo")[0])
    mixed = [PIL.Image.fromarray(pixels[0]), PIL.Image.fromarray(pixels[1]).resize((48, 24))]
    assert encode(mixed, "a photo", height=32, width=32)[0].shape == (2, 4, 16, 16)  # resized first
