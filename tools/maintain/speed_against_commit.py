#!/usr/bin/env python3
"""This checkout's refinement speed against an earlier commit's, both in one process, refine by refine.

The speed-ups of issue 32 (docs/benchmark.md) come from this protocol. This machine's speed drifts by 10-20 %
within minutes, so two benchmark runs minutes apart cannot show a ratio to within 10 %. Here one process holds
both codes and alternates them refine by refine on the same input, swapping the order every pair, after a warm-up
refine of each. The commit's `crm_d2` package is taken from git (`git archive`) and imported under another name.
Each pair's ratio comes from two refines run within a minute of each other.

    python tools/maintain/speed_against_commit.py 5cf302f --sizes 2k 4k --pairs 6 --threads 2
    python tools/maintain/speed_against_commit.py 5cf302f --sizes 2k --photos ../shared/data/crm-train/ccp \
        --photo-count 2 --no-scene

Inputs: the generated scene (`make_scene`, seed 0: thin parts and holes) and, with --photos, real photos upscaled
to the size, as tools/benchmark.py makes them, each with a coarse mask from a segmenter --coarse-factor times
smaller. Both codes run `Refiner(mode=...)` with their own defaults and their own shipped model.

Reported per input: each code's median seconds, the speed-up of every pair (the commit's seconds over this
checkout's) and their median, page faults per refine, and how far the two codes' warm-up outputs differ (the
largest difference, and the pixels on the other side of 0.5). The load average is printed with each row.

This checkout's `Refiner` raises glibc's malloc thresholds (`crm_d2.cpu.warm_malloc_thresholds`). In one process
they hold for the commit's refines too, which favours the commit's code. Time on an idle machine.
"""
import argparse
import importlib
import io
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tools"))

from benchmark import make_input, photo_pairs, size_arg, size_hw  # noqa: E402

from crm_d2.refiner import Refiner  # noqa: E402

# `from crm_d2...` and `import crm_d2...` at the start of a line. Strings stay: a checkpoint's format is "crm_d2".
OWN_IMPORT = re.compile(r"^(\s*)(from|import)(\s+)crm_d2\b", re.M)


def import_commit(ref, into):
    """The Refiner class of commit `ref`'s crm_d2 package, extracted into the folder `into` as crm_d2_<sha> with
    its own imports renamed. Returns (short sha, Refiner)."""

    def git(*args):
        return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True).stdout

    try:
        sha = git("rev-parse", "--short=10", f"{ref}^{{commit}}").decode().strip()
        archive = git("archive", "--format=tar", sha, "crm_d2")
    except (OSError, subprocess.CalledProcessError) as e:
        said = (getattr(e, "stderr", b"") or b"").decode(errors="replace").strip().splitlines()
        sys.exit(f"speed_against_commit: cannot take crm_d2 from commit {ref!r} with git: {said[0] if said else e}")
    name = f"crm_d2_{sha}"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(into, **safe)
    package = Path(into) / name
    (Path(into) / "crm_d2").rename(package)
    for source in package.rglob("*.py"):
        text = source.read_text()
        renamed = OWN_IMPORT.sub(rf"\g<1>\g<2>\g<3>{name}", text)
        if renamed != text:
            source.write_text(renamed)
    sys.path.insert(0, str(into))
    return sha, importlib.import_module(f"{name}.refiner").Refiner


def make_inputs(args):
    """(label, size, scene) for every size and input asked for."""
    photos = photo_pairs(args.photos, args.photo_count) if args.photos else []
    for size in args.sizes:
        hw = size_hw(size)
        if args.scene:
            yield "scene 0", size, make_input(hw, None, 0, args.coarse_factor)
        for pair in photos:
            stem = Path(pair.split(os.pathsep)[0]).stem
            yield f"photo {stem} (upscaled)", size, make_input(hw, pair, 0, args.coarse_factor)


def timed(refiner, scene):
    """(output, seconds, page faults) of one refine."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    out = refiner.refine(scene.image, scene.coarse)
    seconds = time.perf_counter() - start
    return out, seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def compare(refiners, scene, pairs):
    """Warm-up refines of both, then `pairs` pairs alternating (the order swapped every pair)."""
    (_, before), (_, after) = refiners
    out_before, out_after = timed(before, scene)[0], timed(after, scene)[0]
    seconds = {"commit": [], "this": []}
    faults = {"commit": [], "this": []}
    for p in range(pairs):
        for key, refiner in (refiners if p % 2 == 0 else refiners[::-1]):
            _, s, f = timed(refiner, scene)
            seconds[key].append(s)
            faults[key].append(f)
    speedups = [a / b for a, b in zip(seconds["commit"], seconds["this"])]
    return {"commit_s": statistics.median(seconds["commit"]), "this_s": statistics.median(seconds["this"]),
            "seconds": seconds, "speedups": speedups, "speedup": statistics.median(speedups),
            "faults_per_refine": {k: int(statistics.median(v)) for k, v in faults.items()},
            "max_abs_diff": float(np.abs(out_before.astype(np.float64) - out_after).max()),
            "pixels_across_half": int(((out_before > 0.5) != (out_after > 0.5)).sum())}


def markdown(rows, sha):
    head = (f"| size | input | {sha} s | this s | speed-up, pair by pair | median | page faults per refine "
            f"({sha} / this) | largest difference, pixels across 0.5 | load average |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        pairs = ", ".join(f"{x:.2f}" for x in r["speedups"])
        faults = r["faults_per_refine"]
        lines.append(f"| {r['size']} | {r['input']} | {r['commit_s']:.2f} | {r['this_s']:.2f} | {pairs} "
                     f"| **{r['speedup']:.2f}x** | {faults['commit']} / {faults['this']} "
                     f"| {r['max_abs_diff']:.1e}, {r['pixels_across_half']} | {r['load']} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("commit", help="the git commit (or branch, tag) to time this checkout against")
    p.add_argument("--sizes", nargs="+", default=["2k", "4k"], type=size_arg, help="1k 2k 4k 6k or WIDTHxHEIGHT")
    p.add_argument("--mode", choices=["exact", "fast"], default="exact", help="both codes run this mode")
    p.add_argument("--pairs", type=int, default=4, help="timed pairs per input, after one warm-up refine of each")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--coarse-factor", type=float, default=8.0,
                   help="the coarse mask comes from a segmenter this many times smaller than the image")
    p.add_argument("--photos", help="folder with images/ and masks/ (same stems): upscaled real photos as inputs")
    p.add_argument("--photo-count", type=int, default=2, help="photos taken evenly from --photos")
    p.add_argument("--no-scene", dest="scene", action="store_false", help="photos only, no generated scene")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    if args.pairs < 1:
        p.error("--pairs must be at least 1")
    if args.coarse_factor <= 0:
        p.error("--coarse-factor must be positive")
    if not args.scene and not args.photos:
        p.error("--no-scene needs --photos")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sha, CommitRefiner = import_commit(args.commit, tmp)
        refiners = [("commit", CommitRefiner(mode=args.mode)), ("this", Refiner(mode=args.mode))]
        print(f"{args.mode} mode, {torch.get_num_threads()} threads: commit {sha} against this checkout "
              f"({ROOT})", flush=True)
        for label, size, scene in make_inputs(args):
            load = os.getloadavg()[0]
            row = {"size": size, "input": label, "mode": args.mode, "threads": torch.get_num_threads(),
                   **compare(refiners, scene, args.pairs)}
            row["load"] = f"{load:.1f} -> {os.getloadavg()[0]:.1f}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(markdown(rows, sha))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"commit": sha, "commit_refiner": f"{CommitRefiner.__module__}.{CommitRefiner.__name__}",
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
