"""The FKC GPU check script: its `--dry-run` (tiny SDXL parts on the CPU) samples, resamples within prompts only, and
adds no member forwards."""

import importlib.util
import json
import os

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "fkc_sdxl_check.py")


def test_dry_run_resamples_within_prompts_with_equal_member_forwards(tmp_path):
    spec = importlib.util.spec_from_file_location("fkc_sdxl_check", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    output = tmp_path / "fkc.json"
    script.main(["--dry-run", "--steps", "3", "--particles", "3", "--output", str(output)])
    report = json.loads(output.read_text())
    assert report["dry_run"] and report["equal_member_forwards"]
    assert report["cases"]["plain"]["member_forwards"] == [3, 3]
    for name in ("fkc", "fkc_clamp_1"):
        case = report["cases"][name]
        assert case["finite"] and not case["resampled_across_prompts"]
        assert case["resampling_steps"][-1] == [2, [0, 1]]  # the final resampling, both prompts
        assert len(case["ess"]) == 3
