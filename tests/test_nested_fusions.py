"""Fusions of fusions, members whose config uses the fusion's own keys, the deprecated import paths, and the import
graph of `loaders/` (no module-level import of `models/`)."""

import ast
import importlib
import pathlib
import sys

import pytest
import torch

from diffusers_scorefusion import FusedTransformer, FusedUNet
from diffusers_scorefusion.testing import transformer_parts as parts
from diffusers_scorefusion.testing.unet_parts import get_dummy_unet

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "diffusers_scorefusion"


def _unet_inputs():
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    return sample, torch.randn(2, 7, 32, generator=generator)


@torch.no_grad()
def test_fused_unet_of_fused_unets_equals_the_flattened_fusion():
    a, b, c, d = (get_dummy_unet(seed) for seed in range(4))
    nested = FusedUNet([FusedUNet([a, b], weights=[0.3, 0.7]), FusedUNet([c, d], weights=[0.5, 0.5])],
                       weights=[0.4, 0.6])  # fmt: skip
    flat = FusedUNet([a, b, c, d], weights=[0.4 * 0.3, 0.4 * 0.7, 0.6 * 0.5, 0.6 * 0.5])
    sample, hidden = _unet_inputs()
    for timestep in (1, 500, 999):
        expected = flat(sample, timestep, encoder_hidden_states=hidden).sample
        actual = nested(sample, timestep, encoder_hidden_states=hidden).sample
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    assert nested.config.num_members == 2 and nested.config.weights == [0.4, 0.6]
    assert nested.config.block_out_channels == list(a.config.block_out_channels)  # mirrored as before


@torch.no_grad()
def test_fused_transformer_of_fused_transformers_equals_the_flattened_fusion():
    members = [parts.get_dummy_flux_transformer(seed) for seed in range(3)]
    nested = FusedTransformer([FusedTransformer(members[:2], weights=[0.25, 0.75]), members[2]], weights=[0.6, 0.4])
    flat = FusedTransformer(members, weights=[0.6 * 0.25, 0.6 * 0.75, 0.4])
    inputs = _flux_inputs(members[0])
    expected = flat(**inputs, return_dict=False)[0]
    actual = nested(**inputs, return_dict=False)[0]
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    assert nested.config.member_class == "FluxTransformer2DModel"
    assert nested.config.num_members == 2


def _flux_inputs(transformer):
    config = transformer.config
    generator = torch.Generator().manual_seed(0)
    tokens, text_tokens = 16, 8
    return dict(
        hidden_states=torch.randn(1, tokens, config.in_channels, generator=generator),
        encoder_hidden_states=torch.randn(1, text_tokens, config.joint_attention_dim, generator=generator),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=generator),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(tokens, 3),
        txt_ids=torch.zeros(text_tokens, 3),
        guidance=torch.tensor([3.5]) if config.guidance_embeds else None,
    )


def _member_with_keys(member, fusion_class, overrides=None):
    """`member` whose config also holds every config key the fusion defines, with foreign values."""
    keys = fusion_class.base_config_keys + fusion_class.own_config_keys
    values = {key: "foreign" for key in keys}
    values.update(overrides or {})
    member.register_to_config(**values)
    return member


@pytest.mark.parametrize("key", FusedUNet.base_config_keys + FusedUNet.own_config_keys)
def test_fused_unet_own_config_keys_win_over_a_members(key):
    # a prediction_type a member records is read as that member's prediction type: give it a valid one
    member = _member_with_keys(get_dummy_unet(0), FusedUNet, {"prediction_type": "epsilon"})
    reference = FusedUNet([get_dummy_unet(0)], weights=[1.0])
    fused = FusedUNet([member], weights=[1.0])
    assert fused.config[key] == reference.config[key]


@pytest.mark.parametrize("key", FusedTransformer.base_config_keys + FusedTransformer.own_config_keys)
def test_fused_transformer_own_config_keys_win_over_a_members(key):
    members = [_member_with_keys(parts.get_dummy_flux_transformer(seed), FusedTransformer) for seed in range(2)]
    reference = FusedTransformer([parts.get_dummy_flux_transformer(seed) for seed in range(2)])
    fused = FusedTransformer(members)
    assert fused.config[key] == reference.config[key]


def test_a_member_recording_its_prediction_type_is_read_as_such():
    member = get_dummy_unet(0)
    member.register_to_config(prediction_type="v_prediction")
    fused = FusedUNet([member])
    assert fused.config.member_prediction_types == ["v_prediction"]
    assert fused.config.prediction_type == "v_prediction"
    inner = FusedUNet([get_dummy_unet(1)], prediction_type="epsilon")
    assert FusedUNet([inner]).config.member_prediction_types == ["epsilon"]


@pytest.mark.parametrize(
    "old, new",
    [
        ("diffusers_scorefusion.fitting_utils", "diffusers_scorefusion.fitting.fitting_utils"),
        ("diffusers_scorefusion.fitting_schedules", "diffusers_scorefusion.fitting.fitting_schedules"),
        ("diffusers_scorefusion.fitting_encoding", "diffusers_scorefusion.fitting.fitting_encoding"),
        ("diffusers_scorefusion.testing_utils", "diffusers_scorefusion.testing.unet_parts"),
        ("diffusers_scorefusion.testing_utils_transformers", "diffusers_scorefusion.testing.transformer_parts"),
    ],
)
def test_old_import_paths_warn_and_give_the_new_modules(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(FutureWarning, match=f"`{old}` is deprecated.*`{new}`"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


def test_fitting_package_keeps_the_old_names():
    from diffusers_scorefusion import fit_weights, fitting

    assert fitting.fit_weights is fit_weights
    for name in ("FitResult", "encode_for_fitting", "encode_images", "METHODS"):
        assert hasattr(fitting, name), name


def test_loaders_do_not_import_models_at_module_level():
    offenders = []
    for path in sorted((PACKAGE / "loaders").glob("*.py")):
        for node in ast.parse(path.read_text()).body:  # module level only
            if isinstance(node, ast.ImportFrom) and node.level >= 1 and (node.module or "").startswith("models"):
                offenders.append(f"{path.name}: from {'.' * node.level}{node.module}")
            if isinstance(node, ast.ImportFrom) and node.level == 0 and "diffusers_scorefusion.models" in (
                node.module or ""
            ):
                offenders.append(f"{path.name}: from {node.module}")
    assert offenders == []


def test_no_loose_fitting_or_testing_modules_beside_the_packages():
    loose = {path.name for path in PACKAGE.glob("*.py")}
    for name in ("fitting_utils.py", "fitting_schedules.py", "fitting_encoding.py", "testing_utils.py",
                 "testing_utils_transformers.py"):  # fmt: skip
        assert name in loose  # deprecated aliases, a few lines each
        assert len((PACKAGE / name).read_text().splitlines()) < 10
    assert (PACKAGE / "fitting" / "__init__.py").is_file() and (PACKAGE / "testing" / "__init__.py").is_file()
