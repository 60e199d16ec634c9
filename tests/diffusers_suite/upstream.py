"""Diffusers' own test-suite, retargeted at the fusion: import the upstream tests and derive fusion test classes.

The upstream `tests/` folder (verbatim, never copied into this project) is found at `$SCOREFUSION_DIFFUSERS_TESTS`,
`../shared/diffusers-tests` beside the project, or in the cache filled by
`python -m diffusers_scorefusion.testing.fetch_diffusers_tests` (a sparse clone of the installed version's tag), and
imported as the package `diffusers_upstream_tests` (its
modules use relative imports, so any package name works). For each upstream test class the harness derives:

- `stock`: the upstream class unchanged (the baseline; run with `--upstream-stock`, else read from the committed
  baseline file of the installed Diffusers version);
- `fusion1`: the pipeline's `unet` (or `transformer`) replaced by a one-member fusion (`FusedUNet` or
  `FusedTransformer`), weights `[1.0]`;
- `fusion2`: a two-member fusion with one-hot weights `[0.0, 1.0]` (the stock denoiser is member 1; member 0 is a
  perturbed copy that must never run);

and, for pipelines with a ScoreFusion class, the pipeline class replaced by it. Nothing else changes.
"""

import copy
import functools
import importlib
import importlib.util
import inspect
import os
import sys
from types import ModuleType
from typing import Any, Dict, List, Optional, Sequence

import numpy
import torch

from diffusers_scorefusion.testing.fetch_diffusers_tests import (
    DiffusersTestsLocation,
    fetched_record,
    find_diffusers_tests,
)

PACKAGE = "diffusers_upstream_tests"
VARIANTS = ("stock", "fusion1", "fusion2")
FUSION_VARIANTS = ("fusion1", "fusion2")


def _project_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def upstream_location() -> DiffusersTestsLocation:
    """Where the upstream tests are (`$SCOREFUSION_DIFFUSERS_TESTS`, `../shared/diffusers-tests`, or the cache that
    `python -m diffusers_scorefusion.testing.fetch_diffusers_tests` fills), or why they are not found."""
    return find_diffusers_tests(_project_root())


def upstream_root() -> Optional[str]:
    """The upstream `tests/` folder, or `None` when it is not on this machine."""
    return upstream_location().path


def upstream_commit() -> Optional[str]:
    """The upstream commit: recorded by the fetch, or named in the checkout's README (the shared copy records it)."""
    root = upstream_root()
    if root is None:
        return None
    fetched = fetched_record(root)
    if fetched:
        return fetched.get("commit")
    readme = os.path.join(os.path.dirname(root), "README.md")
    if not os.path.isfile(readme):
        return None
    with open(readme, encoding="utf-8") as handle:
        for word in handle.read().replace("\n", " ").split():
            if len(word) == 40 and all(c in "0123456789abcdef" for c in word):
                return word
    return None


def import_upstream(module: str) -> ModuleType:
    """Imports `module` (e.g. `"pipelines.stable_diffusion.test_stable_diffusion"`) from the upstream tests."""
    if PACKAGE not in sys.modules:
        root = upstream_root()
        if root is None:
            raise FileNotFoundError(
                f"Diffusers' tests were not found: {upstream_location().reason}; fetch them with "
                "`python -m diffusers_scorefusion.testing.fetch_diffusers_tests`"
            )
        spec = importlib.util.spec_from_file_location(
            PACKAGE, os.path.join(root, "__init__.py"), submodule_search_locations=[root]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{PACKAGE}.{module}")


def _perturbed_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` with every floating-point parameter shifted (private generator: the global RNG is
    untouched)."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for parameter in other.parameters():
            if parameter.is_floating_point():
                noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
                parameter.add_(noise.to(parameter.dtype) * 0.1)
    return other


def fuse(denoiser: Any, variant: str) -> Any:
    """The fusion that replaces `denoiser` in variant `variant`."""
    if denoiser is None or variant == "stock":
        return denoiser
    from diffusers import UNet2DConditionModel

    from diffusers_scorefusion import FusedTransformer, FusedUNet

    fusion_class = FusedUNet if isinstance(denoiser, UNet2DConditionModel) else FusedTransformer
    if variant == "fusion1":
        return fusion_class([denoiser], weights=[1.0])
    return fusion_class([_perturbed_copy(denoiser), denoiser], weights=[0.0, 1.0])


def _fuse_components(components: Any, variant: str, key: str) -> Any:
    if isinstance(components, tuple):  # the LoRA tests return (components, text_lora_config, unet_lora_config)
        return (_fuse_components(components[0], variant, key), *components[1:])
    if isinstance(components, dict) and key in components:
        components = dict(components)
        components[key] = fuse(components[key], variant)
    return components


def derive(
    namespace: Dict[str, Any],
    module: str,
    class_names: Sequence[str],
    fusion_pipeline_class: Optional[type] = None,
    denoiser_key: str = "unet",
    full_two_member_suite: Optional[bool] = None,
) -> List[type]:
    """Adds `{UpstreamClass}__{variant}` test classes for every variant to `namespace` (a test module's globals).

    `fusion_pipeline_class` replaces the upstream `pipeline_class` in the fusion variants (`None`: the stock pipeline
    class, with only its denoiser fused). `full_two_member_suite` (default: when there is a fusion pipeline class)
    runs the whole suite on the two-member fusion too; otherwise that variant runs only the bit-for-bit comparison
    with the stock pipeline, unless pytest gets `--upstream-all-variants` (this keeps CI within its time budget).
    """
    if full_two_member_suite is None:
        full_two_member_suite = fusion_pipeline_class is not None
    upstream = import_upstream(module)
    derived = []
    for class_name in class_names:
        base = getattr(upstream, class_name)
        for variant in VARIANTS:
            attributes: Dict[str, Any] = {
                "__module__": namespace["__name__"],
                "upstream_test": f"{module.replace('.', '/')}.py::{class_name}",
                "upstream_variant": variant,
                "upstream_full_suite": variant != "fusion2" or full_two_member_suite,
            }
            if variant != "stock":
                attributes["get_dummy_components"] = _fused_dummy_components(base, variant, denoiser_key)
                attributes["test_scorefusion_output_equals_stock"] = _output_equals_stock(base)
                if fusion_pipeline_class is not None:
                    attributes["pipeline_class"] = fusion_pipeline_class
            cls = type(f"{class_name}__{variant}", (base,), attributes)
            namespace[cls.__name__] = cls
            derived.append(cls)
    return derived


def _run_dummy(test: Any, pipeline_class: type, components: Any) -> Any:
    """The pipeline's first output on the suite's dummy inputs (classic suites take `(device, seed)`)."""
    if isinstance(components, tuple):
        components = components[0]
    pipe = pipeline_class(**components)
    pipe.set_progress_bar_config(disable=True)
    parameters = inspect.signature(test.get_dummy_inputs).parameters
    inputs = test.get_dummy_inputs("cpu") if "device" in parameters else test.get_dummy_inputs()
    if isinstance(inputs, tuple):  # the LoRA tests return (noise, input_ids, pipeline_inputs)
        inputs = inputs[-1]
    torch.manual_seed(0)
    output = pipe(**inputs)[0]
    return (
        torch.as_tensor(output)
        if not isinstance(output, list)
        else torch.as_tensor([numpy.asarray(o) for o in output])
    )


def _output_equals_stock(base: type):
    def test_scorefusion_output_equals_stock(self) -> None:
        """Ours, not upstream: the fusion's output equals the stock pipeline's, bit for bit."""
        if getattr(base, "get_dummy_inputs", None) is None:
            return
        stock = _run_dummy(self, base.pipeline_class, base.get_dummy_components(self))
        fused = _run_dummy(self, self.pipeline_class, self.get_dummy_components())
        assert torch.equal(fused, stock), f"max |fusion - stock| = {(fused - stock).abs().max().item():.3g}"

    return test_scorefusion_output_equals_stock


def _fused_dummy_components(base: type, variant: str, key: str):
    @functools.wraps(base.get_dummy_components)  # keeps its signature: some tests read it (e.g. `num_layers`)
    def get_dummy_components(self, *args: Any, **kwargs: Any) -> Any:
        return _fuse_components(base.get_dummy_components(self, *args, **kwargs), variant, key)

    return get_dummy_components
