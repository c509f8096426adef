"""benchmarks/gpu_check.sh on the CPU (GRIN_GPU_CHECK_DEVICE=cpu): stages, timeouts, the budget, results
written as stages end, the summary table printed last; and the summary's parsers."""

import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_check_summary as summary_mod


def run_check(tmp_path, timeout=600, **env) -> tuple[subprocess.CompletedProcess, str, str]:
    out, results = str(tmp_path / "out"), str(tmp_path / "results")
    full = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHON": sys.executable,
            "GRIN_GPU_CHECK_DEVICE": "cpu", "GRIN_GPU_CHECK_RESULTS": results, "OUT": out, **env}
    proc = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=full,
                          check=False)
    return proc, out, results


def stages(results: str) -> dict:
    return {s["stage"]: s for s in summary_mod.read_stages(results)}


def test_stage_timeout_results_and_summary_last(tmp_path):
    proc, out, results = run_check(tmp_path, GRIN_GPU_CHECK_STAGES="env,model", GRIN_GPU_CHECK_TIMEOUT_MODEL="2")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # a stage timed out
    got = stages(results)
    assert got["env"]["status"] == "ok" and got["model"]["status"] == "timeout" and got["model"]["limit"] == 2
    with open(os.path.join(results, "env.log")) as f:
        assert "torch" in f.read()
    assert proc.stdout.rstrip().splitlines()[-1].startswith("| model | timeout |")  # the table comes last
    assert sorted(os.listdir(out)) == ["calibration.json", "gpu_check.tar.gz", "summary.json", "summary.md"]
    with tarfile.open(os.path.join(out, "gpu_check.tar.gz")) as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
    assert {"env.log", "model.log", "stages.tsv", "summary.md"} <= names
    with open(os.path.join(out, "summary.json")) as f:
        assert [s["stage"] for s in json.load(f)["stages"]] == ["env", "model"]


def test_budget_skips_stages_that_cannot_fit(tmp_path):
    proc, _, results = run_check(tmp_path, GRIN_GPU_CHECK_STAGES="env,routing", GRIN_GPU_CHECK_BUDGET_S="5")
    assert proc.returncode == 1
    assert {s["status"] for s in stages(results).values()} == {"skipped"}
    assert "skipped" in proc.stdout


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt install shellcheck)")
def test_shellcheck_is_clean():
    proc = subprocess.run(["shellcheck", SCRIPT], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout


def test_summary_parsers(tmp_path):
    assert summary_mod.parse_flags(["--num-layers", "2", "--bf16", "--seq-length", "4096", "--model-preset",
                                    "grin-16x3.8b", "--lr", "1e-4"]) == {
        "num_layers": 2, "bf16": True, "seq_length": 4096, "model_preset": "grin-16x3.8b", "lr": 1e-4}
    (tmp_path / "tier-junit.xml").write_text(
        '<testsuites><testsuite><testcase classname="a" name="ok"/><testcase classname="a" name="bad">'
        '<failure message="x"/></testcase><testcase classname="b" name="s"><skipped/></testcase>'
        '</testsuite></testsuites>')
    assert summary_mod.tier(str(tmp_path)) == {"passed": 1, "failed": 1, "skipped": 1, "failed_tests": ["a::bad"]}


@pytest.mark.slow
def test_dry_run_of_pretrain_and_benchmarks(tmp_path):
    """Every non-tier stage at toy shapes; the pretrain is a calibration point with memory and throughput."""
    proc, out, results = run_check(tmp_path, GRIN_GPU_CHECK_STAGES="pretrain,moe-layer,routing,model",
                                   GRIN_GPU_CHECK_BUDGET_S="900", GRIN_GPU_CHECK_TIMEOUT_PRETRAIN="400")
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert {s["status"] for s in stages(results).values()} == {"ok"}
    with open(os.path.join(out, "calibration.json")) as f:
        (point,) = json.load(f)
    assert point["layout"]["num_layers"] == 2 and point["layout"]["model_preset"] == "grin-16x3.8b"
    assert point["peak_allocated_gib"] > 0 and point["peak_reserved_gib"] > 0
    assert point["tokens_per_s"] > 0 and point["step_s"] > 0
    with open(os.path.join(out, "summary.json")) as f:
        benches = json.load(f)["bench"]
    assert set(benches) == {"moe-layer", "routing", "model"} and all(b["rows"] for b in benches.values())
