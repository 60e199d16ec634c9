"""Upstream tests that pass on the stock pipeline and are not run on the fusion, each with its reason.

Allowed only where passing would break a promise of this package (never unpickling, never running code from a config)
or where the test inspects a single UNet's internals. docs/works-like-diffusers.md lists them; the test of ours named
beside each checks the behaviour it stands for.
"""

import fnmatch
from typing import Optional

# (upstream test id pattern or patterns, reason, our test that checks the behaviour instead, fusion variants)
EXCEPTIONS = [
    (
        ("pipelines/stable_diffusion/*::test_StableDiffusionMixin_component",
         "pipelines/stable_diffusion_xl/*::test_StableDiffusionMixin_component",
         "pipelines/controlnet/*::test_StableDiffusionMixin_component"),  # the UNet pipelines (SD3's test passes)
        "asserts `isinstance(pipe.unet, UNet2DConditionModel)`: a fusion wraps UNets, it is not one",
        "tests/test_drop_in.py::test_fusion_pipeline_with_a_stock_pipeline_class",
        ("fusion1", "fusion2"),
    ),
    (
        "pipelines/flux/test_pipeline_flux.py::TestFluxPipelineFasterCache::test_faster_cache_state",
        "expects the FasterCache denoiser hook at the root of `pipe.transformer`: a fusion applies the cache to each "
        "member, so each member's root carries it",
        "tests/test_drop_in.py::test_caches_apply_to_every_member_and_reset_after_sampling",
        ("fusion1", "fusion2"),
    ),
    (
        "pipelines/flux/test_pipeline_flux.py::TestFluxPipelinePyramidAttentionBroadcast"
        "::test_pyramid_attention_broadcast_layers",
        "counts the hooks in `pipe.transformer.modules()` against one transformer's blocks: two members have twice the "
        "blocks, each hooked",
        "tests/test_drop_in.py::test_caches_apply_to_every_member_and_reset_after_sampling",
        ("fusion2",),
    ),
]


def exception_reason(upstream_id: str, variant: str) -> Optional[str]:
    """The reason an upstream test is not run on fusion variant `variant`, or `None`."""
    for patterns, reason, _, variants in EXCEPTIONS:
        patterns = (patterns,) if isinstance(patterns, str) else patterns
        if variant in variants and any(fnmatch.fnmatchcase(upstream_id, pattern) for pattern in patterns):
            return reason
    return None
