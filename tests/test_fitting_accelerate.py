import json
import math
import os
import subprocess
import sys

import _accelerate_fit_script as script
import numpy as np
import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_accelerate_fit_script.py")


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    """Both processes' results of `_accelerate_fit_script.py` run by torchrun on 2 CPU processes (gloo)."""
    out_dir = tmp_path_factory.mktemp("accelerate")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        SCRIPT,
        str(out_dir),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)  # a hang fails here
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = []
    for rank in range(2):
        with open(out_dir / f"rank{rank}.json") as file:
            results.append(json.load(file))
    return results


def test_two_processes_equal_one_process(two_process_results):
    single = script.run()
    for result in two_process_results:
        assert result["num_processes"] == 2 and result["provenance"]["num_processes"] == 2
        for key in ("weights", "standard_errors", "gram", "linear", "constant", "per_model_loss", "fused_weights"):
            np.testing.assert_allclose(result[key], single[key], rtol=1e-9, atol=1e-12, err_msg=key)
        assert result["loss"] == pytest.approx(single["loss"], rel=1e-12)
        for key in ("data_fingerprint", "noise_seed", "seed", "timestep_bin_edges"):
            assert result["provenance"][key] == single["provenance"][key], key
    # every process returns the same result; forwards are counted over both shards (unequal: 7 and 6 samples)
    assert two_process_results[0]["weights"] == two_process_results[1]["weights"]
    rows = [math.ceil(n * 3 / 4) for n in (7, 6)]
    assert two_process_results[0]["num_forward_passes"] == 3 * sum(rows)
    assert sorted(result["member_calls"] for result in two_process_results) == sorted(3 * r for r in rows)
    assert single["num_forward_passes"] == 3 * math.ceil(script.NUM_SAMPLES * 3 / 4)


def test_two_processes_equal_one_process_for_flow_matching(two_process_results):
    single = script.run_flow()
    for result in two_process_results:
        for key in ("weights", "standard_errors", "gram"):
            np.testing.assert_allclose(result["flow"][key], single[key], rtol=1e-9, atol=1e-12, err_msg=key)
        assert result["flow"]["num_forward_passes"] == 3 * sum(math.ceil(n * 3 / 4) for n in (7, 6))  # shards 7, 6
        assert result["flow"]["provenance"]["num_processes"] == 2 and result["flow"]["provenance"]["objective"] == (
            "flow_matching"
        )


def test_a_failure_on_one_process_is_raised_on_every_process(two_process_results):
    assert "members [1] returned NaN" in two_process_results[1]["failure"]
    assert "1 other process(es) failed" in two_process_results[0]["failure"]


def test_two_processes_choose_the_same_auto_bins_as_one_process(two_process_results):
    single = script.run_auto()
    assert single["selection"]["num_timestep_bins"] > 1
    for result in two_process_results:
        assert result["auto"]["selection"]["num_timestep_bins"] == single["selection"]["num_timestep_bins"]
        assert result["auto"]["selection"]["relative_smoothness"] == single["selection"]["relative_smoothness"]
        assert result["auto"]["edges"] == single["edges"]
        np.testing.assert_allclose(result["auto"]["weights"], single["weights"], rtol=1e-9, atol=1e-12)
        curves = [[point["cv_loss"] for point in r["selection"]["curve"]] for r in (result["auto"], single)]
        np.testing.assert_allclose(*curves, rtol=1e-9)
        assert result["auto"]["num_forward_passes"] == single["num_forward_passes"]
