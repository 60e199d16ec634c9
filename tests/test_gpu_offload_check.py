"""The GPU offloading benchmark script: its `--dry-run` (tiny members on the CPU) runs every mode and agrees."""

import importlib.util
import json
import os

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "gpu_offload_check.py")


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("gpu_offload_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sdxl_config_is_the_sdxl_base_unet(script):
    assert script.parameter_count(script.SDXL_UNET_CONFIG) == 2_567_463_684  # stable-diffusion-xl-base-1.0's UNet


def test_dry_run_runs_every_mode_with_identical_outputs(script, tmp_path):
    output = tmp_path / "result.json"
    script.main(["--dry-run", "--steps", "1", "--output", str(output)])
    report = json.loads(output.read_text())
    assert report["dry_run"] and report["num_members"] == 2 and report["cross_device_check"] is None
    modes = report["modes"]
    expected_modes = ["all_on_device", "model_cpu_offload", "sequential_cpu_offload", "group_offload_per_member",
                      "leaf_group_offload_per_member"]  # fmt: skip
    assert list(modes) == expected_modes
    for name, result in modes.items():
        assert result["finite"] and result["max_abs_diff_vs_all_on_device"] == 0.0, name
        assert result["step_s"] > 0 and result["peak_memory_gib"] is None


def test_refuses_a_real_run_without_cuda(script, tmp_path):
    if script.torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit):
        script.main(["--output", str(tmp_path / "x.json")])
