#!/usr/bin/env python
"""Every check a GPU must pass, in one command that fits in 6 minutes on one H100 (issue 11).

    python tools/gpu_check.py OUT_DIR                      # on a CUDA machine, crm_d2 installed
    python tools/gpu_check.py OUT_DIR --wheels WHEELS_DIR  # first: pip install --no-index --find-links WHEELS_DIR -e .
    python tools/gpu_check.py OUT_DIR --device cpu --quick # the dry run (tests/test_gpu_check.py): under a minute
    python tools/gpu_check.py OUT_DIR --only kernel train  # some parts only

Parts, each in its own subprocess with its own timeout (one that fails or hangs does not stop the others), in
order of importance, within an overall --time-limit:
  install         pip install --no-index --find-links WHEELS_DIR -e .   (with --wheels only)
  env             torch, CUDA, Triton, GPU; modules crm_d2 needs that are missing
  pytest          the device tests on the device: pytest tests -m device --device cuda (log: pytest_cuda.log);
                  each compares with the CPU path where outputs must agree
  kernel          the fused Triton decoder (crm_d2/kernels.py) against the torch path on several shapes, MLP
                  depths, widths and tail blocks; its speed against the torch path; its first-use check (through
                  CRM.ensemble, for real) and both fallbacks (a disagreeing result, a kernel that cannot compile)
  memory          6000x4000 exact mode in a 4 GiB card: tools/benchmark.py with --budget-mb 256 and the CUDA
                  allocator capped at 4 GiB less 0.5 GiB for the CUDA context (which the allocator does not see)
  train           a short `crm-d2 train` on synthetic data (ResNet-50, AMP, channels_last): iterations per second
  bench-r50       tools/benchmark.py, ResNet-50 architecture (random weights), exact and amp, 1K/2K/4K/6000x4000
  bench-released  tools/benchmark.py, the released pipeline (crm_d2/reference.py) at 1K and 2K: the baseline
  bench-demo      tools/benchmark.py, the shipped demo model, exact and fast, 1K/2K/4K/6000x4000
Benchmarks: median of --runs after --warmup, per-stage times, peak torch.cuda.max_memory_allocated.

Writes OUT_DIR/report.md and OUT_DIR/report.json (rewritten atomically after every part, so a killed run
still leaves a report), OUT_DIR/pytest_<device>.log, OUT_DIR/logs/<part>.log and the parts' own outputs.
Exit status: 0 when every part that ran passed.
"""
import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CARD_GB, CONTEXT_GB = 4.0, 0.5  # the card to emulate, and what its CUDA context takes outside the allocator
# What crm_d2 imports (module: distribution), for the env part and the install step.
REQUIRED = {"torch": "torch", "numpy": "numpy", "cv2": "opencv-python-headless", "pycocotools": "pycocotools",
            "tqdm": "tqdm", "yaml": "PyYAML", "pytest": "pytest"}


# ----------------------------------------------------------------------------------------------- parts
def part_list(args, out):
    """The parts as dicts: name, what, cmd (or run: in this process), timeout_s, parse (log path -> results),
    outputs (removed before the part runs, so that a rerun into the same folder never reports stale results)."""
    py = sys.executable
    dev, quick = args.device, args.quick
    me = [py, str(Path(__file__).resolve())]
    bench = [py, str(ROOT / "tools" / "benchmark.py"), "--devices", dev]
    if quick:  # tiny sizes and models: the dry run only checks that every part still runs
        sizes, big, r50, runs, warmup = ["128x96"], "160x120", "random-tiny", 1, 1
    else:
        sizes, big, r50, runs, warmup = ["1k", "2k", "4k", "6k"], "6k", "random-r50", args.runs, 1
    timing = ["--runs", str(runs), "--warmup", str(warmup)]
    parts = []
    if args.wheels:
        parts.append(dict(name="install", what=f"pip install --no-index --find-links {args.wheels} -e .",
                          cmd=None, timeout_s=120, run=lambda p, log: install(args.wheels, log)))
    parts.append(dict(name="env", what="versions, GPU, missing modules", cmd=me + ["--part", "env", "--device", dev,
                      "--result", str(out / "env.json")], timeout_s=60, parse=lambda p: read_json(out / "env.json"),
                      outputs=[out / "env.json"]))
    if quick:  # one device test is enough to show the pytest part works; the suite itself runs them all
        tests = ["tests/test_refiner.py", "-m", "device", "-k", "agrees_with_cpu and exact"]
    else:
        tests = ["tests", "-m", "device", "--continue-on-collection-errors"]
    junit = out / f"pytest_{dev.replace(':', '')}.xml"
    parts.append(dict(name="pytest", what=f"the device tests on {dev}: pytest {' '.join(tests)} --device {dev}",
                      cmd=[py, "-m", "pytest", *tests, "--device", dev, "-p", "no:cacheprovider", "-rA",
                           f"--junitxml={junit}"],
                      timeout_s=150, log=out / f"pytest_{dev.replace(':', '')}.log", parse=lambda p: read_junit(junit),
                      outputs=[junit]))
    parts.append(dict(name="kernel", what="fused Triton decoder vs torch path: shapes, speed, first use, fallbacks",
                      cmd=me + ["--part", "kernel", "--device", dev, "--result", str(out / "kernel.json")]
                      + (["--quick"] if quick else []),
                      # on CPU the kernel runs in Triton's interpreter, where Triton is installed
                      env={"CRM_D2_TRITON": "1", **({"TRITON_INTERPRET": "1"} if dev == "cpu" else {})},
                      timeout_s=90, parse=lambda p: read_json(out / "kernel.json"), outputs=[out / "kernel.json"]))
    cap = ["--gpu-memory-gb", str(CARD_GB - CONTEXT_GB)]
    parts.append(dict(name="memory", what=f"{big} exact, --budget-mb 256, allocator capped at "
                                          f"{CARD_GB - CONTEXT_GB:g} GiB ({CARD_GB:g} GiB card less the CUDA context)",
                      cmd=bench + ["--sizes", big, "--modes", "exact", "--weights", r50, "--budget-mb", "256",
                                   "--runs", "1", *cap], timeout_s=90, parse=read_bench))
    if quick:
        train_over = ["model.preset=tiny", "data.train=[{type: synthetic, count: 4, size: 48, seed: 0}]",
                      "data.crop_size=32", "data.num_workers=0", "solver.batch_size=2", "solver.max_iter=4",
                      "log.period=2"]
    else:
        train_over = ["model.preset=r50", "data.train=[{type: synthetic, count: 96, size: 320, seed: 0}]",
                      "data.crop_size=224", "data.num_workers=8", "solver.batch_size=12",
                      f"solver.max_iter={args.train_iters}", "log.period=10"]
    train_over += ["model.init=null", "data.val=[]", "solver.steps=[100000]", "solver.amp=true",
                   "solver.channels_last=true", "checkpoint.period=0", "val.period=0", "log.tensorboard=false"]
    parts.append(dict(name="train", what="crm-d2 train, synthetic data, AMP + channels_last: iterations per second",
                      cmd=[py, "-m", "crm_d2.cli", "train", "--config", str(ROOT / "configs" / "training" / "crm_r50_paper.yaml"),
                           "--device", dev, "--output", str(out / "train"), *train_over],
                      timeout_s=120, parse=lambda p: read_training(out / "train"), outputs=[out / "train"]))
    parts.append(dict(name="bench-r50", what=f"ResNet-50 architecture ({r50}), exact and amp, {' '.join(sizes)}",
                      cmd=bench + ["--sizes", *sizes, "--modes", "exact", "amp", "--weights", r50, *timing],
                      timeout_s=150, parse=read_bench))
    parts.append(dict(name="bench-released", what=f"released pipeline (crm_d2/reference.py), {r50}, "
                                                  f"{' '.join(sizes[:2])}",
                      cmd=bench + ["--sizes", *sizes[:2], "--modes", "reference", "--weights", r50, *timing],
                      timeout_s=90, parse=read_bench))
    parts.append(dict(name="bench-demo", what=f"shipped demo model, exact and fast, {' '.join(sizes)}",
                      cmd=bench + ["--sizes", *sizes, "--modes", "exact", "fast", "--weights", "demo", *timing],
                      timeout_s=120, parse=read_bench))
    if args.only:
        unknown = set(args.only) - {p["name"] for p in parts}
        if unknown:
            raise SystemExit(f"--only: unknown part(s) {sorted(unknown)}; parts: {[p['name'] for p in parts]}")
        parts = [p for p in parts if p["name"] in args.only]
    return parts


def child_env(args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # crm_d2 from this checkout even where the editable install could not be made
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if args.device == "cpu" and args.quick:  # tiny tensors: threads only contend (and the machine may be shared)
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_command(cmd, log_path, timeout, env, cwd=ROOT):
    """Run cmd in its own process group with stdout+stderr to log_path; on timeout kill the whole group (a
    benchmark's children too). Returns (status, returncode)."""
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(map(str, cmd)) + "\n\n")
        log.flush()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            log.write(f"\n[gpu_check: killed after {timeout:.0f} s]\n")
            return "timeout", None
        except BaseException:  # gpu_check itself interrupted or terminated: take the part with it
            kill_group(proc)
            raise
    return ("passed" if rc == 0 else "failed"), rc


def kill_group(proc):
    """SIGTERM, then (5 s later, or once the leader is gone) SIGKILL to the process group that `proc` leads: the
    part and anything it started."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    proc.wait()


def run_parts(parts, out, deadline, env, report):
    """Run every part (whatever the others did), recording each in report["parts"] and rewriting the report
    after each one."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    for p in parts:
        rec = {"name": p["name"], "what": p["what"], "status": "not run", "seconds": 0.0}
        report["parts"].append(rec)
        left = deadline - time.monotonic()
        if left < 15:
            rec["status"], rec["error"] = "not run", "overall --time-limit reached"
            write_report(out, report)
            continue
        log = Path(p.get("log") or out / "logs" / f"{p['name']}.log")
        rec["log"] = os.path.relpath(log, out)
        timeout = min(p["timeout_s"], left)
        for old in map(Path, p.get("outputs", ())):
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink(missing_ok=True)
        t0 = time.monotonic()
        print(f"[gpu_check] {p['name']}: {p['what']} (timeout {timeout:.0f} s) ...", flush=True)
        try:
            if p.get("cmd") is None:
                rec["status"], rec["results"] = p["run"](p, log)
            else:
                rec["cmd"] = " ".join(map(str, p["cmd"]))
                rec["status"], rec["returncode"] = run_command(p["cmd"], log, timeout, {**env, **p.get("env", {})})
            if p.get("parse"):
                rec["results"] = p["parse"](log)
                # a part whose command succeeded but whose own checks failed (kernel, benchmark rows) fails
                if rec["status"] == "passed" and isinstance(rec["results"], dict) and rec["results"].get("failed"):
                    rec["status"] = "failed"
        except Exception as e:  # noqa: BLE001 - a broken part must not stop the others
            rec["error"] = f"{type(e).__name__}: {e}"
            if rec["status"] in ("passed", "not run"):  # a timeout stays a timeout
                rec["status"] = "failed"
        rec["seconds"] = round(time.monotonic() - t0, 1)
        if rec["status"] != "passed" and log.exists():  # the reason, in the report itself
            rec["log_tail"] = "\n".join(log.read_text(errors="replace").splitlines()[-25:])[-4000:]
        print(f"[gpu_check] {p['name']}: {rec['status']} in {rec['seconds']} s", flush=True)
        write_report(out, report)
    return report


# ----------------------------------------------------------------------------------------------- install
def install(wheels, log_path):
    """pip install --no-index --find-links WHEELS -e . (what crm_d2 needs that is missing first; then the checkout,
    with build isolation, then without it; if that fails too the parts run the checkout through PYTHONPATH)."""
    results = {"wheels": sorted(p.name for p in Path(wheels).glob("*")) if Path(wheels).is_dir() else None}
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels)]
    with open(log_path, "w") as log:
        def pip_run(extra):
            log.write("$ " + " ".join(pip + extra) + "\n")
            log.flush()
            return subprocess.run(pip + extra, stdout=log, stderr=subprocess.STDOUT, timeout=110).returncode

        missing = [dist for mod, dist in REQUIRED.items() if importlib.util.find_spec(mod) is None]
        results["missing_before"] = missing
        if missing and pip_run(missing) != 0:
            results["error"] = f"could not install {missing} from {wheels}"
        # Offline, build isolation cannot fetch setuptools, and without --use-pep517 pip falls back to
        # `setup.py develop`, which calls pip with isolation again (seen on the H200 machine): build with the
        # setuptools already installed, through PEP 660.
        for extra in ([], ["--no-build-isolation", "--use-pep517"]):
            if pip_run(extra + ["--no-deps", "-e", str(ROOT)]) == 0:
                results["editable"] = "installed" + (f" ({' '.join(extra)})" if extra else "")
                break
        else:
            results["editable"] = "failed: running crm_d2 from the checkout (PYTHONPATH)"
    importlib.invalidate_caches()
    still = [dist for mod, dist in REQUIRED.items() if importlib.util.find_spec(mod) is None]
    results["missing_after"] = still
    return ("failed" if still else "passed"), results


# ----------------------------------------------------------------------------------------------- internal parts
def env_part(device):
    import torch

    info = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "missing_modules": [d for m, d in REQUIRED.items() if importlib.util.find_spec(m) is None]}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            info["failed"] = "CUDA is not available"
            return info
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version(),
                    tf32_conv_default=torch.backends.cudnn.allow_tf32)
        if info["triton"] is None:
            info["failed"] = "Triton is not installed: the fused decoder cannot run"
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                             "--format=csv,noheader"], capture_output=True, text=True,
                                            timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def kernel_part(device, quick):
    """The fused decoder against the torch path (errors per case), its speed, its first-use check through
    CRM.ensemble and both fallbacks, all for real on `device` (on CPU: Triton's interpreter when installed)."""
    import warnings

    import torch

    from crm_d2 import kernels
    from crm_d2.model import CRM, CRMConfig, make_coord

    dev = torch.device(device)
    res = {"triton": getattr(kernels.triton, "__version__", None), "device": device, "cases": [], "speed": []}
    can_run = kernels.triton is not None and (dev.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
    failures = []

    def model(depth=4, hidden=32, seed=0):
        torch.manual_seed(seed)
        m = CRM(CRMConfig(layers=(1, 1, 1), width=8, depth=depth, hidden=hidden)).eval()
        with torch.no_grad():  # outputs that vary (a fresh MLP gives ~0 logits everywhere)
            for p in m.imnet.parameters():
                p.mul_(4.0)
        return m.to(dev)

    def terms(m, B, feat, out, seed=0):
        g = torch.Generator().manual_seed(seed)
        proj = torch.randn(B, *feat, m.cfg.hidden, generator=g).to(dev)
        rows, cols = m.query_terms(proj, make_coord(out[0], dev), make_coord(out[1], dev), (2 / out[0], 2 / out[1]))
        return proj, rows, cols

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    # 1. First use, for real: CRM.ensemble in inference dispatches to the kernel and checks it once.
    m = model()
    proj, rows, cols = terms(m, 2, (9, 11), (37, 23))
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = m.ensemble(proj, rows, cols)
        want = m._ensemble_torch(proj, rows, cols)
    res["first_use"] = {"kernel_available": can_run, "state_after": dict(kernels._state),
                        "warnings": [str(w.message) for w in caught],
                        "max_err_vs_torch": float((first - want).abs().max())}
    if can_run and not (kernels._state == {"checked": True, "ok": True} and not caught):
        failures.append("first-use check did not pass")

    # 2. Shapes, MLP depths and widths, tail blocks (query counts not a multiple of 64).
    cases = [(4, 32, 2, (9, 11), (37, 23)), (2, 32, 1, (9, 11), (5, 70))]
    if not quick:
        cases += [(4, 32, 3, (40, 60), (300, 450)), (1, 16, 1, (7, 5), (1, 1)), (3, 64, 2, (33, 17), (129, 65)),
                  (4, 32, 1, (128, 160), (1024, 1283)), (4, 32, 1, (400, 600), (1600, 2401)),
                  (5, 32, 4, (3, 3), (9, 7))]
    for depth, hidden, B, feat, out in cases:
        case = {"depth": depth, "hidden": hidden, "batch": B, "feature_grid": list(feat), "output": list(out),
                "queries": B * out[0] * out[1], "tail": (B * out[0] * out[1]) % 64}
        if not can_run:
            case["status"] = "skipped: Triton is not installed" if kernels.triton is None else "skipped"
            res["cases"].append(case)
            continue
        try:
            m = model(depth, hidden, seed=depth)
            proj, rows, cols = terms(m, B, feat, out)
            with torch.no_grad():
                want = m._ensemble_torch(proj, rows, cols)
                got = kernels.fused_ensemble(proj, rows, cols, m.imnet.layers)
            err, scale = float((got - want).abs().max()), float(want.abs().max())
            case.update(max_abs_err=err, max_abs_logit=scale, status="passed" if err < 1e-4 * scale else "failed")
        except Exception as e:  # noqa: BLE001
            case.update(status="failed", error=f"{type(e).__name__}: {e}"[:500])
        if case["status"] == "failed":
            failures.append(f"case {case}")
        res["cases"].append(case)

    # 3. Speed against the torch path: one stage's full decode (padded image at full scale, stride-2 features).
    sizes = {"1k": (832, 1088), "2k": (1664, 2112), "4k": (2224, 3904)} if not quick else {"96x72": (136, 160)}
    m = model()
    for name, (H, W) in sizes.items():
        proj, rows, cols = terms(m, 1, ((H + 1) // 2, (W + 1) // 2), (H, W))
        row = {"size": name, "queries": H * W}
        paths = {"torch": lambda: m._ensemble_torch(proj, rows, cols)}
        if can_run and dev.type == "cuda":
            paths["kernel"] = lambda: kernels.fused_ensemble(proj, rows, cols, m.imnet.layers)
        elif can_run:
            row["kernel_error"] = "not timed in Triton's interpreter"
        for path, fn in paths.items():
            try:
                with torch.no_grad():
                    fn()  # warm-up (compilation)
                    sync()
                    if dev.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(dev)
                    times = []
                    for _ in range(3 if quick else 5):
                        t0 = time.perf_counter()
                        fn()
                        sync()
                        times.append(time.perf_counter() - t0)
                row[f"{path}_ms"] = 1000 * statistics.median(times)
                if dev.type == "cuda":
                    row[f"{path}_peak_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
            except Exception as e:  # noqa: BLE001 - e.g. the torch path out of memory at 4K
                row[f"{path}_error"] = f"{type(e).__name__}: {e}"[:300]
                if path == "kernel":
                    failures.append(f"kernel speed run at {name}")
        if "torch_ms" in row and "kernel_ms" in row:
            row["speedup"] = row["torch_ms"] / row["kernel_ms"]
        res["speed"].append(row)
        del proj, rows, cols

    # 4. Fallbacks, for real. (a) The kernel's result disagrees with the torch path: CRM.ensemble returns the
    # torch result with a warning and uses the torch path from then on.
    m = model()
    proj, rows, cols = terms(m, 1, (9, 11), (37, 23))
    with torch.no_grad():
        want = m._ensemble_torch(proj, rows, cols)
    kernels._state.update(checked=False, ok=True)
    real_torch = m._ensemble_torch
    m._ensemble_torch = lambda *a: real_torch(*a) + 1  # the check's reference, off by one
    fb = {}
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            got = m.ensemble(proj, rows, cols)
            fb["returned_reference"] = bool(torch.equal(got, want + 1))
        except Exception as e:  # noqa: BLE001
            fb["error"] = f"{type(e).__name__}: {e}"[:300]
        m._ensemble_torch = real_torch
        later = m.ensemble(proj, rows, cols)
    fb.update(warned=any("disagrees" in str(w.message) for w in caught), state_after=dict(kernels._state),
              torch_path_after=bool(torch.equal(later, want)))
    if can_run:
        fb["passed"] = bool(fb.get("returned_reference") and fb["warned"] and not kernels._state["ok"]
                            and fb["torch_path_after"])
    else:
        fb["passed"] = "not applicable: the kernel is not used here"
    res["fallback_mismatch"] = fb
    # (b) A kernel that cannot compile (hidden width 24: tl.arange wants a power of two) or launch.
    m = model(hidden=24)
    proj, rows, cols = terms(m, 1, (9, 11), (37, 23))
    kernels._state.update(checked=False, ok=True)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        want = m._ensemble_torch(proj, rows, cols)
        got = kernels.checked_fused_ensemble(proj, rows, cols, m.imnet.layers, lambda: want)
    fb = {"warning": next((str(w.message) for w in caught if "could not run" in str(w.message)), None),
          "state_after": dict(kernels._state)}
    fb["passed"] = bool(torch.equal(got, want) and fb["warning"] and not kernels._state["ok"])
    res["fallback_compile_error"] = fb
    for key in ("fallback_mismatch", "fallback_compile_error"):
        if res[key]["passed"] is False:
            failures.append(key)
    res["failed"] = failures
    return res


# ----------------------------------------------------------------------------------------------- parsing
def read_json(path):
    return json.loads(Path(path).read_text())


def read_junit(path):
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    problems, skipped = [], []
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        for tag in ("failure", "error"):
            el = case.find(tag)
            if el is not None:
                problems.append({"test": name, "kind": tag, "message": (el.get("message") or "")[:500]})
        el = case.find("skipped")
        if el is not None:
            skipped.append({"test": name, "reason": (el.get("message") or "")[:300]})
    counts.update(problems=problems, skipped_tests=skipped)
    if not counts["tests"]:
        counts["failed"] = "no device tests ran"
    return counts


def read_bench(log_path):
    """The benchmark's results: one JSON line per configuration, as tools/benchmark.py prints them (so a part
    that timed out still reports what it measured)."""
    rows = []
    for line in Path(log_path).read_text().splitlines():
        if line.startswith("{"):
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if isinstance(r, dict) and "size" in r and "mode" in r:
                r.pop("times_s", None)
                rows.append(r)
    out = {"results": rows}
    bad = [f"{r['size']} {r['mode']}: {r['error'][-200:]}" for r in rows if "error" in r]
    if bad:
        out["failed"] = bad
    return out


def read_training(folder):
    rows = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if "time_per_iter" in r]
    if not train_rows:
        return {"failed": "no training rows in metrics.jsonl"}
    timed = train_rows[1:] or train_rows  # the first period holds the start-up (cuDNN autotuning, workers)
    t = statistics.median(r["time_per_iter"] for r in timed)
    cfg_path = Path(folder) / "config.yaml"
    out = {"iterations": train_rows[-1]["iter"], "iters_per_s": 1 / t, "s_per_iter": t,
           "data_s_per_iter": statistics.median(r["data_time"] for r in timed),
           "loss_first": train_rows[0].get("loss"), "loss_last": train_rows[-1].get("loss"),
           "model_final": (Path(folder) / "model_final.pth").exists()}
    if cfg_path.exists():
        import yaml

        cfg = yaml.safe_load(cfg_path.read_text())
        out.update(preset=cfg["model"]["preset"], batch_size=cfg["solver"]["batch_size"],
                   crop_size=cfg["data"]["crop_size"], amp=cfg["solver"]["amp"],
                   channels_last=cfg["solver"].get("channels_last"))
    if not out["model_final"]:
        out["failed"] = "no model_final.pth"
    return out


# ----------------------------------------------------------------------------------------------- report
def write_report(out, report):
    from crm_d2.io import atomic_write

    report["updated"] = now()
    report["passed"] = all(p["status"] in ("passed", "skipped") for p in report["parts"])

    def write_json(tmp):
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1, default=str)

    def write_md(tmp):
        try:
            text = markdown(report)
        except Exception as e:  # noqa: BLE001 - a formatting slip must not stop the check; report.json has it all
            text = f"# GPU check\n\n(report.md could not be formatted: {type(e).__name__}: {e}; see report.json)\n"
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(out / "report.json", write_json, ".json")
    atomic_write(out / "report.md", write_md, ".md")


def _bench_markdown():
    spec = importlib.util.spec_from_file_location("crm_benchmark", ROOT / "tools" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.markdown


def markdown(report):
    env = next((p.get("results") for p in report["parts"] if p["name"] == "env"), None) or {}
    bad = [p["name"] for p in report["parts"] if p["status"] not in ("passed", "skipped")]
    lines = [f"# GPU check ({report['device']}{', quick dry run' if report['quick'] else ''})", "",
             f"- command: `{report['command']}`",
             f"- started {report['started']}, last update {report['updated']}",
             f"- machine: {env.get('gpu') or platform.node()} ({env.get('gpu_memory_gb', '?')} GiB), "
             f"torch {env.get('torch', '?')}, CUDA {env.get('cuda_build')}, Triton {env.get('triton')}, "
             f"Python {env.get('python', platform.python_version())}",
             f"- result: **{'FAILED: ' + ', '.join(bad) if bad else 'all parts passed'}**",
             "", "| part | status | s | what | log |", "|---|---|---|---|---|"]
    for p in report["parts"]:
        lines.append(f"| {p['name']} | {p['status']} | {p['seconds']} | {p['what']} | {p.get('log', '')} |")
    for p in report["parts"]:
        r = p.get("results")
        lines += ["", f"## {p['name']}: {p['status']}", ""]
        if p.get("error"):
            lines.append(f"error: `{p['error']}`")
        if p.get("cmd"):
            lines.append(f"`{p['cmd']}`")
            lines.append("")
        if p.get("log_tail"):
            lines += [f"end of {p.get('log')}:", "```", p["log_tail"], "```", ""]
        if not r:
            continue
        if isinstance(r, dict) and r.get("failed"):
            lines.append(f"**failed**: {r['failed']}")
            lines.append("")
        name = p["name"]
        if name == "pytest":
            lines.append(f"{r['passed']} passed, {r['failures']} failed, {r['errors']} errors, "
                         f"{r['skipped']} skipped (of {r['tests']})")
            lines += [f"- {x['kind']}: `{x['test']}`: {x['message'][:200]}" for x in r["problems"]]
            lines += [f"- skipped: `{x['test']}`: {x['reason']}" for x in r["skipped_tests"]]
        elif name == "kernel":
            fu = r["first_use"]
            lines.append(f"Triton {r['triton']}; first use through CRM.ensemble: state {fu['state_after']}, "
                         f"max |result - torch| {fu['max_err_vs_torch']:.1e}, warnings {fu['warnings'] or 'none'}")
            lines += ["", "| depth | hidden | batch | features | output | tail | max abs err | max logit | status |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for c in r["cases"]:
                err = f"{c['max_abs_err']:.1e}" if "max_abs_err" in c else c.get("error", "")
                mx = f"{c['max_abs_logit']:.1f}" if "max_abs_logit" in c else ""
                lines.append(f"| {c['depth']} | {c['hidden']} | {c['batch']} | {c['feature_grid']} | {c['output']} "
                             f"| {c['tail']} | {err} | {mx} | {c['status']} |")
            lines += ["", "| decode (1 stage, full scale) | queries | torch ms | kernel ms | speed-up "
                          "| peak GB torch / kernel |", "|---|---|---|---|---|---|"]
            for s in r["speed"]:
                t = f"{s['torch_ms']:.2f}" if "torch_ms" in s else s.get("torch_error", "")
                k = f"{s['kernel_ms']:.2f}" if "kernel_ms" in s else s.get("kernel_error", "not run")
                sp = f"{s['speedup']:.1f}x" if "speedup" in s else ""
                pk = (f"{s.get('torch_peak_gb', 0):.2f} / {s.get('kernel_peak_gb', 0):.2f}"
                      if "torch_peak_gb" in s else "")
                lines.append(f"| {s['size']} | {s['queries']} | {t} | {k} | {sp} | {pk} |")
            lines += ["", f"- fallback, result disagrees: {r['fallback_mismatch']}",
                      f"- fallback, kernel cannot compile: {r['fallback_compile_error']}"]
        elif name == "train":
            if "iters_per_s" in r:
                lines.append(f"{r.get('preset')} CRM, batch {r.get('batch_size')} x {r.get('crop_size')} px crops, "
                             f"amp {r.get('amp')}, channels_last {r.get('channels_last')}: **{r['iters_per_s']:.2f} "
                             f"it/s** ({r['s_per_iter']:.3f} s/it, data wait {r['data_s_per_iter']:.3f} s/it) over "
                             f"{r['iterations']} iterations; loss {r['loss_first']:.4f} -> {r['loss_last']:.4f}; "
                             f"model_final.pth written: {r['model_final']}")
        elif name in ("memory", "bench-r50", "bench-demo", "bench-released"):
            rows = r.get("results") or []
            if rows:
                lines.append(_bench_markdown()(rows))
            cuda_rows = [x for x in rows if "peak_reserved_gb" in x]
            if cuda_rows:
                lines.append("")
                lines.append("peak reserved by the CUDA allocator (GB): " + ", ".join(
                    f"{x['size']} {x['mode']} {x['peak_reserved_gb']:.2f}" for x in cuda_rows))
            if name == "bench-released":
                lines += released_speedups(report, rows)
        elif name in ("env", "install"):
            lines.append("```")
            lines.append(json.dumps(r, indent=1, default=str))
            lines.append("```")
    return "\n".join(lines) + "\n"


def released_speedups(report, released):
    exact = {x["size"]: x for p in report["parts"] if p["name"] == "bench-r50" for x in (p.get("results") or {})
             .get("results", []) if x.get("mode") == "exact" and "median_s" in x}
    out = []
    for x in released:
        if "median_s" in x and x["size"] in exact:
            out.append(f"- {x['size']}: released {x['median_s']:.3f} s, exact {exact[x['size']]['median_s']:.3f} s: "
                       f"**{x['median_s'] / exact[x['size']]['median_s']:.1f}x** faster")
    return [""] + out if out else []


def now():
    return datetime.datetime.now().isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------- main
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", help="folder for report.md, report.json, the pytest log and the parts' logs")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for the dry run")
    p.add_argument("--wheels", help="first pip install --no-index --find-links WHEELS -e . (offline GPU machines)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, tiny model, few iterations: the dry run")
    p.add_argument("--only", nargs="+", metavar="PART", help="run these parts only")
    p.add_argument("--runs", type=int, default=3, help="timed runs per benchmark configuration (after 1 warm-up)")
    p.add_argument("--train-iters", type=int, default=60, help="iterations of the training part")
    p.add_argument("--time-limit", type=float, default=345,
                   help="seconds for all parts together; parts that would start later are reported as not run")
    # internal: one in-process part, its result as JSON
    p.add_argument("--part", choices=["env", "kernel"], help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.part:
        res = env_part(args.device) if args.part == "env" else kernel_part(args.device, args.quick)
        Path(args.result).write_text(json.dumps(res, indent=1, default=str))
        print(json.dumps(res, indent=1, default=str))
        return 1 if res.get("failed") else 0
    if not args.out:
        p.error("the output folder is required")
    out = Path(args.out).resolve()
    if args.wheels:
        args.wheels = str(Path(args.wheels).resolve())
    out.mkdir(parents=True, exist_ok=True)
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "device": args.device,
              "quick": args.quick, "started": now(), "parts": []}
    deadline = time.monotonic() + args.time_limit
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))  # so that a terminated check ends its running part
    t0 = time.monotonic()
    run_parts(part_list(args, out), out, deadline, child_env(args), report)
    report["total_s"] = round(time.monotonic() - t0, 1)
    write_report(out, report)
    print(f"[gpu_check] {'all parts passed' if report['passed'] else 'FAILED'} in {report['total_s']} s; "
          f"report: {out / 'report.md'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
