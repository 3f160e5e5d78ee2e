#!/usr/bin/env python3
"""Per-segment cost of panoptic refinement: segments per second, and where the time goes.

Two workloads: the `crm-d2 demo` sample (five CCP photos, their label regions made coarse as the demo makes
them), and generated COCO-like images (640x480, 20-40 segments: stuff bands and things of every size, on
textured colours). Each configuration refines every segment of every image with crm_d2.panoptic.refine, as
`crm-d2 panoptic` and the Detectron2 path do, and reports segments/s, encoder and decoder time, and the number
of encoder calls.

    python tools/maintain/segment_speed.py                                   # the defaults, both workloads
    python tools/maintain/segment_speed.py --scales 0.125 0.25 0.5 1 --margin 0.25   # issue 12's setting
    python tools/maintain/segment_speed.py --json out.json --threads 2

Time it on an idle machine (the load average is printed with the numbers).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from crm_d2.commands.common import ScalesAction  # noqa: E402
from crm_d2.commands.demo import SAMPLE, labels_to_panoptic, load_sample, simulate_coarse  # noqa: E402
from crm_d2.panoptic.refine import SegmentRefineOptions, refine_panoptic  # noqa: E402
from crm_d2.refiner import Refiner  # noqa: E402
from crm_d2.train.synthetic import _texture  # noqa: E402


def coco_like(seed, size=(480, 640), segments=(20, 40)):
    """(image RGB, id map, segments_info) with 3-5 stuff bands and things from 12 px to half the image."""
    rng = np.random.default_rng(seed)
    h, w = size
    n = int(rng.integers(segments[0], segments[1] + 1))
    n_stuff = int(rng.integers(3, 6))
    ids = np.zeros((h, w), np.int32)
    cuts = np.sort(rng.choice(np.arange(h // 8, h - h // 8), n_stuff - 1, replace=False))
    xs = np.arange(w)
    rows = np.arange(h)[:, None]
    for k in range(n_stuff):  # wavy horizontal bands
        top = np.zeros(w, int) if k == 0 else \
            cuts[k - 1] + (10 * np.sin(xs / rng.uniform(30, 90) + rng.uniform(0, 6))).astype(int)
        ids[np.broadcast_to(rows >= top[None], (h, w))] = k + 1
    segs = [{"id": k + 1, "category_id": 100 + k, "isthing": 0} for k in range(n_stuff)]
    for k in range(n_stuff, n):
        r = int(np.exp(rng.uniform(np.log(6), np.log(min(h, w) / 4))))
        cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        mask = np.zeros((h, w), np.uint8)
        cv2.ellipse(mask, (cx, cy), (r, int(r * rng.uniform(0.5, 1.5))), float(rng.uniform(0, 180)), 0, 360, 1, -1)
        if mask.any():
            ids[mask > 0] = k + 1
            segs.append({"id": k + 1, "category_id": 1 + k % 80, "isthing": 1, "score": float(rng.uniform(0.3, 1))})
    present = set(np.unique(ids).tolist())
    segs = [s for s in segs if s["id"] in present]
    image = np.zeros((h, w, 3), np.uint8)
    for s in segs:
        m = ids == s["id"]
        image[m] = _texture(h, w, rng, rng.integers(20, 235, 3))[m]
    return cv2.GaussianBlur(image, (3, 3), 0.7), ids, segs


def demo_workload(limit=None):
    items, categories = load_sample(SAMPLE, limit=limit)
    work = []
    for _, image, labels in items:
        ids, segs = labels_to_panoptic(labels, categories)
        coarse, coarse_segs = simulate_coarse(ids, segs, categories)
        segs = [dict(s, isthing=categories[s["category_id"]]["isthing"]) for s in coarse_segs]
        work.append((image, coarse, segs))
    return work


def measure(refiner, work, options, repeat=1):
    """Best of `repeat` passes: (seconds, segments, encoder s, decoder s, encoder calls)."""
    n = sum(1 for _, ids, segs in work for s in segs if (ids == s["id"]).sum() >= options.min_area)  # untimed
    best = None
    for _ in range(repeat):
        refiner.profile = []
        t = time.perf_counter()
        for image, ids, segs in work:
            refine_panoptic(refiner, image, ids, segs, options)
        dt = time.perf_counter() - t
        prof = refiner.profile
        stages = [p for p in prof if "encoder_s" in p]  # the finish (GrabCut, snap) records its own entries
        row = (dt, n, sum(p["encoder_s"] for p in stages), sum(p["decoder_s"] for p in stages), len(stages))
        best = row if best is None or row[0] < best[0] else best
    refiner.profile = None
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="demo")
    p.add_argument("--scales", nargs="+", action=ScalesAction, default=None, help="default: the checkpoint's")
    p.add_argument("--margin", type=float, default=SegmentRefineOptions.margin)
    p.add_argument("--generated", type=int, default=6, help="generated COCO-like images (0 = none)")
    p.add_argument("--demo", type=int, default=5, help="demo sample photos (0 = none)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    refiner = Refiner(args.weights, device="cpu", scales=args.scales)
    options = SegmentRefineOptions(margin=args.margin)
    workloads = {}
    if args.demo:
        workloads["demo sample"] = demo_workload(args.demo)
    if args.generated:
        workloads["COCO-like 640x480"] = [coco_like(seed) for seed in range(args.generated)]
    measure(refiner, [workloads[next(iter(workloads))][0]], options)  # warm-up
    results = {"settings": {"weights": args.weights, "scales": refiner.scales, "margin": args.margin,
                            "threads": args.threads,
                            "load_before": os.getloadavg()[0]}}
    print(f"weights {args.weights}, scales {refiner.scales}, margin {args.margin}, {args.threads} threads, "
          f"load {os.getloadavg()[0]:.2f}")
    print("| workload | images | segments | seconds | segments/s | encoder s | decoder s | encoder calls |")
    print("|---|---|---|---|---|---|---|---|")
    for name, work in workloads.items():
        dt, n, enc, dec, calls = measure(refiner, work, options, args.repeat)
        results[name] = {"images": len(work), "segments": n, "seconds": dt, "segments_per_s": n / dt,
                         "encoder_s": enc, "decoder_s": dec, "encoder_calls": calls}
        print(f"| {name} | {len(work)} | {n} | {dt:.2f} | {n / dt:.2f} | {enc:.2f} | {dec:.2f} | {calls} |")
    results["settings"]["load_after"] = os.getloadavg()[0]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
