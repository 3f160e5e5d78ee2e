"""tools/gpu_check.py: its CPU dry run (every part, tiny sizes) and its keep-going, kill-on-timeout machinery."""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["env", "pytest", "kernel", "memory", "train", "bench-r50", "bench-released", "bench-demo"]


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_dry_run_on_cpu(tmp_path):
    out = tmp_path / "gpu_check"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), str(out), "--device", "cpu",
                           "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    report = json.loads((out / "report.json").read_text())
    statuses = {p["name"]: p["status"] for p in report["parts"]}
    assert proc.returncode == 0 and report["passed"], (statuses, proc.stdout[-3000:], proc.stderr[-3000:])
    assert list(statuses) == PARTS and set(statuses.values()) == {"passed"}
    results = {p["name"]: p.get("results") for p in report["parts"]}
    md = (out / "report.md").read_text()
    assert "all parts passed" in md and all(f"## {name}: passed" in md for name in PARTS)
    # the pytest part ran a device test and kept its log
    assert results["pytest"]["passed"] >= 1 and results["pytest"]["failures"] == 0
    assert "passed" in (out / "pytest_cpu.log").read_text()
    # the kernel part: its cases are there (run in Triton's interpreter where Triton is installed), the torch path
    # was timed, and a kernel that cannot compile or launch fell back to torch for real
    kernel = results["kernel"]
    assert len(kernel["cases"]) >= 2 and kernel["speed"][0]["torch_ms"] > 0
    assert kernel["fallback_compile_error"]["passed"] is True
    # training ran on the synthetic source with AMP and channels_last asked for, and exported its model
    train = results["train"]
    assert train["iters_per_s"] > 0 and train["model_final"] and train["channels_last"] is True
    # every benchmark configuration gave a row with timings and per-stage times
    for name, modes in (("memory", {"exact"}), ("bench-r50", {"exact", "amp"}), ("bench-released", {"reference"}),
                        ("bench-demo", {"exact", "fast"})):
        rows = results[name]["results"]
        assert {r["mode"] for r in rows} == modes and all(r["median_s"] > 0 and r["stages"] for r in rows), rows
    assert "released" in md and "faster" in md  # the baseline against exact mode


def test_a_failing_or_hanging_part_does_not_stop_the_others(tmp_path):
    gc = load_gpu_check()
    py = sys.executable
    pid_file = tmp_path / "grandchild.pid"
    hang = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']);"
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(120)")

    def broken(part, log):
        raise RuntimeError("this part is broken")

    parts = [
        dict(name="fails", what="exits 3", cmd=[py, "-c", "import sys; sys.exit(3)"], timeout_s=60),
        dict(name="hangs", what="sleeps, with a child", cmd=[py, "-c", hang], timeout_s=3),
        dict(name="broken", what="raises", cmd=None, run=broken, timeout_s=60),
        dict(name="bad-results", what="exits 0, its own checks fail", cmd=[py, "-c", "print(1)"], timeout_s=60,
             parse=lambda log: {"failed": ["case 3"]}),
        dict(name="works", what="prints", cmd=[py, "-c", "print('fine')"], timeout_s=60,
             parse=lambda log: {"log": Path(log).read_text().splitlines()[-1]}),
    ]
    report = {"command": "test", "device": "cpu", "quick": True, "started": gc.now(), "parts": []}
    gc.run_parts(parts, tmp_path, time.monotonic() + 600, dict(os.environ), report)
    parts.append(dict(name="late", what="after the time limit", cmd=[py, "-c", "print(1)"], timeout_s=60))
    gc.run_parts(parts[-1:], tmp_path, time.monotonic() + 5, dict(os.environ), report)

    got = {p["name"]: p for p in report["parts"]}
    assert [p["name"] for p in report["parts"]] == ["fails", "hangs", "broken", "bad-results", "works", "late"]
    assert got["fails"]["status"] == "failed" and got["fails"]["returncode"] == 3
    assert got["hangs"]["status"] == "timeout" and "killed after" in (tmp_path / "logs" / "hangs.log").read_text()
    assert got["broken"]["status"] == "failed" and "this part is broken" in got["broken"]["error"]
    assert got["bad-results"]["status"] == "failed"
    assert got["works"]["status"] == "passed" and got["works"]["results"] == {"log": "fine"}
    assert got["late"]["status"] == "not run" and "time-limit" in got["late"]["error"]
    # the timed-out part's own child went with it (its process group was killed)
    pid = int(pid_file.read_text())
    for _ in range(50):
        try:
            state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
        except (FileNotFoundError, IndexError):
            break
        if state == "Z":  # killed, waiting for its (re-)parent to reap it
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the hanging part's child {pid} is still running")
    # the report on disk says what failed
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["passed"] is False
    md = (tmp_path / "report.md").read_text()
    assert "FAILED: fails, hangs, broken, bad-results, late" in md
