#!/usr/bin/env python
"""Time CRM refinement per image size, mode and device; peak memory; per-stage breakdown; quality of fast mode.

    python tools/benchmark.py                                   # CPU (and CUDA when present), 1K-6K, exact + fast
    python tools/benchmark.py --sizes 1k 2k --modes exact reference --runs 3
    python tools/benchmark.py --weights demo --sizes 4k         # fast vs exact IoU/mBA on a generated scene
    python tools/benchmark.py --weights demo --sizes 4k --photos ../shared/data/crm-train/ecssd --photo-count 5
    python tools/benchmark.py --devices cuda --sizes 6k --modes exact --budget-mb 256 --gpu-memory-gb 4  # 4 GiB card

Every configuration runs in its own subprocess so that peak memory (ru_maxrss on CPU, max_memory_allocated on
CUDA) belongs to that configuration alone. Inputs are generated scenes (crm_d2.train.synthetic.make_scene) or,
with --photos (a folder with images/ and masks/ of the same stems), real photos upscaled to the size with their
masks (`upscale_photo`; there is no real 4K data here), each with a low-resolution segmenter's coarse mask.
"reference" is the released pipeline (crm_d2.reference: layer4 computed, four 256-d gathers per query) for
speed-up figures. Sizes are 1k, 2k, 4k, 6k or WIDTHxHEIGHT. --warmup runs each configuration that many times
before the timed runs (first-use costs: cuDNN's algorithm choice, the Triton kernel's compilation and check).
--gpu-memory-gb caps the CUDA caching allocator (`torch.cuda.set_per_process_memory_fraction`) to emulate a
smaller card. Results print as a Markdown table and can be saved as JSON (--json); each result is also printed
as one JSON line as soon as it is measured.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SIZES = {"1k": (768, 1024), "2k": (1600, 2048), "4k": (2160, 3840), "6k": (4000, 6000)}


def size_hw(size):
    """(H, W) of a size name (1k, 2k, 4k, 6k) or of WIDTHxHEIGHT."""
    if size in SIZES:
        return SIZES[size]
    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be one of {', '.join(SIZES)} or WIDTHxHEIGHT, got {size!r}")
    if w < 33 or h < 33:
        raise argparse.ArgumentTypeError(f"size {size}: at least 33 pixels on each side")
    return h, w


def size_arg(size):
    size_hw(size)
    return size


def run_one(args):
    import numpy as np
    import torch

    from crm_d2.metrics import boundary_accuracy, iou
    from crm_d2.reference import make_layer4, reference_refine
    from crm_d2.inputs import option_text
    from crm_d2.refiner import Refiner

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    H, W = size_hw(args.size)
    cuda = args.device.startswith("cuda")
    if cuda and args.gpu_memory_gb:
        from crm_d2.distributed import with_index

        dev = with_index(args.device)
        total = torch.cuda.get_device_properties(dev).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_memory_gb * 2**30 / total), dev)
    scene = make_input((H, W), args.photo, args.seed, args.coarse_factor)
    mask = scene.coarse
    random = args.weights.startswith("random-")
    refiner = Refiner(weights=None if random else args.weights, allow_random=random,
                      config=args.weights[len("random-"):] if random else None, device=args.device,
                      mode="fast" if args.mode == "fast" else "exact", memory_budget=args.budget_mb << 20,
                      scales=args.scales, amp=args.mode == "amp", edge_snap=args.edge_snap,
                      rounds=args.rounds, grabcut=args.grabcut)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    layer4 = make_layer4(refiner.model).to(refiner.device) if args.mode == "reference" else None

    def once():
        refiner.profile = []
        t0 = time.perf_counter()
        if args.mode == "reference":
            pred = reference_refine(refiner.model, scene.image, mask.astype(np.float32) / 255, layer4=layer4,
                                    timings=refiner.profile)
        else:
            pred = refiner.refine(scene.image, mask, roi=args.roi)
        if cuda:
            torch.cuda.synchronize()
        return pred, time.perf_counter() - t0

    warmup_s = [once()[1] for _ in range(args.warmup)]
    times, profiles, out = [], [], None
    for _ in range(args.runs):
        out, t = once()
        times.append(t)
        profiles.append(refiner.profile)
    # The breakdown is the median run's (the lower median for an even count), so that its parts add up to the total
    # printed beside them.
    k = sorted(range(len(times)), key=times.__getitem__)[(len(times) - 1) // 2]
    stages = [st for st in profiles[k] if "scale" in st]
    snap_s = sum(st.get("edge_snap_s", 0.0) for st in profiles[k])
    grabcut_s = sum(st.get("grabcut_s", 0.0) for st in profiles[k])
    # glue: everything that is not the encoder, the decoder or the finish (resizes, padding, copies, the band)
    glue_s = times[k] - sum(st["encoder_s"] + st["decoder_s"] for st in stages) - snap_s - grabcut_s
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    res = {"size": args.size, "hw": [H, W],
           "input": os.path.basename(args.photo.split(os.pathsep)[0]) if args.photo else f"scene {args.seed}",
           "mode": args.mode + ("+roi" if args.roi else ""), "device": args.device,
           "weights": args.weights, "runs": args.runs, "median_s": statistics.median(times), "times_s": times,
           "warmup_s": warmup_s, "peak_mem_gb": peak / 2**30,
           "mpix_per_s": H * W / 1e6 / statistics.median(times),
           "stages": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in st.items()} for st in stages],
           "edge_snap": option_text(refiner.edge_snap), "edge_snap_s": round(snap_s, 3),
           "rounds": option_text(refiner.rounds), "grabcut": option_text(refiner.grabcut),
           "grabcut_s": round(grabcut_s, 3), "glue_s": round(glue_s, 3), "coarse_factor": args.coarse_factor,
           "threads": torch.get_num_threads(), "budget_mb": args.budget_mb}
    if cuda:
        res["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
        res["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
        res["gpu_memory_cap_gb"] = args.gpu_memory_gb
    if args.save_pred:
        np.save(args.save_pred, out)
    gt = scene.gt > 127
    res["iou_gt"] = 100 * iou(out > 0.5, gt)
    res["mba_gt"] = 100 * boundary_accuracy(out, gt)
    res["coarse_iou_gt"] = 100 * iou(mask > 127, gt)
    res["coarse_mba_gt"] = 100 * boundary_accuracy(mask, gt)
    if args.compare_to:
        ref = np.load(args.compare_to)
        res["max_abs_diff_vs_exact"] = float(np.abs(ref - out).max())
        res["iou_vs_exact"] = 100 * iou(out > 0.5, ref > 0.5)
        res["mba_vs_exact"] = 100 * boundary_accuracy(out, ref > 0.5)
    print("RESULT " + json.dumps(res))


def make_input(hw, photo, seed, coarse_factor=None):
    """The generated scene of that seed, or the photo ('image:mask' paths, `photo_pairs`) upscaled to hw, with a
    coarse mask from a segmenter `coarse_factor` times smaller than hw (None or 0: the generator's own)."""
    from crm_d2.io import read_image, read_mask
    from crm_d2.train.synthetic import make_scene, upscale_photo

    segmenter_side = max(hw) / coarse_factor if coarse_factor else None
    if photo:
        image_path, mask_path = photo.split(os.pathsep)
        return upscale_photo(read_image(image_path), read_mask(mask_path), hw, seed=seed,
                             segmenter_side=segmenter_side)
    return make_scene(hw, seed=seed, segmenter_side=segmenter_side)


def child(cfg, extra=()):
    cmd = [sys.executable, os.path.abspath(__file__), "--one", "--size", cfg["size"], "--mode", cfg["mode"],
           "--device", cfg["device"], "--weights", cfg["weights"], "--runs", str(cfg["runs"]), "--seed",
           str(cfg["seed"]), "--budget-mb", str(cfg["budget_mb"])] + list(extra)
    for flag in ("coarse_factor", "threads"):
        if cfg.get(flag):
            cmd += ["--" + flag.replace("_", "-"), str(cfg[flag])]
    if cfg.get("photo"):
        cmd += ["--photo", cfg["photo"]]
    if cfg.get("scales"):
        cmd += ["--scales"] + ([cfg["scales"]] if isinstance(cfg["scales"], str) else [str(s) for s in cfg["scales"]])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    sys.stderr.write(proc.stderr[-3000:])
    return {"size": cfg["size"], "mode": cfg["mode"], "device": cfg["device"], "error": proc.stderr.strip()[-300:]}


def markdown(results):
    head = ("| size | input | device | mode | median s | MPix/s | peak GB | encoder s (per scale) "
            "| decoder s (per scale) | finish s | glue s | IoU/mBA vs GT | coarse IoU/mBA "
            "| vs exact IoU/mBA, max diff |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['size']} | {r.get('input', '')} | {r['device']} | {r['mode']} "
                         f"| failed: {r['error'][-80:]} |")
            continue
        enc = " / ".join(f"{s['encoder_s']:.2f}" for s in r["stages"])
        dec = " / ".join(f"{s['decoder_s']:.2f}" for s in r["stages"])
        vs = (f"{r['iou_vs_exact']:.2f}/{r['mba_vs_exact']:.2f}, {r['max_abs_diff_vs_exact']:.1e}"
              if "iou_vs_exact" in r else "")
        snap = f" (edge snap {r['edge_snap_s']:.2f})" if r.get("edge_snap_s") else ""
        snap += f" (grabcut {r['grabcut_s']:.2f})" if r.get("grabcut_s") else ""
        finish = r.get("edge_snap_s", 0) + r.get("grabcut_s", 0)
        lines.append(f"| {r['size']} | {r['input']} | {r['device']} | {r['mode']} | {r['median_s']:.2f}{snap} "
                     f"| {r['mpix_per_s']:.2f} "
                     f"| {r['peak_mem_gb']:.2f} | {enc} | {dec} | {finish:.2f} | {r.get('glue_s', 0):.2f} "
                     f"| {r['iou_gt']:.2f}/{r['mba_gt']:.2f} "
                     f"| {r['coarse_iou_gt']:.2f}/{r['coarse_mba_gt']:.2f} | {vs} |")
    return "\n".join(lines)


def main():
    from crm_d2.commands.common import add_scales_argument, edge_snap_argument, grabcut_argument, rounds_argument

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), type=size_arg, help="1k 2k 4k 6k or WIDTHxHEIGHT")
    p.add_argument("--modes", nargs="+", default=["exact", "fast"], choices=["exact", "fast", "amp", "reference"],
                   help="amp: exact mode with a bfloat16 autocast encoder")
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    p.add_argument("--weights", default="random-r50",
                   help="checkpoint path, 'demo', or random-<preset> (timing only: random weights make fast mode's "
                        "band meaningless)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=0, help="untimed runs of each configuration before --runs")
    p.add_argument("--gpu-memory-gb", type=float, default=None,
                   help="CUDA: cap the caching allocator at this many GiB (emulates a smaller card)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--coarse-factor", type=float, default=None,
                   help="coarse masks from a segmenter this many times coarser than the image (e.g. 8); default: "
                        "the scene seed's own (96-320 px on the long side)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--budget-mb", type=int, default=512)
    p.add_argument("--edge-snap", default=None, type=edge_snap_argument,
                   help="Refiner's edge_snap (RADIUS:PASSES:EPS or off; default: the model's own)")
    p.add_argument("--rounds", default=None, type=rounds_argument,
                   help="Refiner's rounds (COUNT[:MIN_SHIFT]; default: the model's own)")
    p.add_argument("--grabcut", default=None, type=grabcut_argument,
                   help="Refiner's grabcut (BAND[:ITERS[:MIN_SHIFT]] or off; default: the model's own)")
    add_scales_argument(p)
    p.add_argument("--photos", help="folder with images/ and masks/ (same stems): upscaled real photos as inputs")
    p.add_argument("--photo-count", type=int, default=3, help="photos taken evenly from --photos")
    p.add_argument("--json", help="write all results to this JSON file")
    # internal: one configuration in this process
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--device", help=argparse.SUPPRESS)
    p.add_argument("--roi", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--photo", help=argparse.SUPPRESS)
    p.add_argument("--save-pred", help=argparse.SUPPRESS)
    p.add_argument("--compare-to", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return run_one(args)

    import tempfile

    import torch

    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    inputs = photo_pairs(args.photos, args.photo_count) if args.photos else [None]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for device in devices:
            for size, (k, photo) in ((s, p) for s in args.sizes for p in enumerate(inputs)):
                exact_pred = os.path.join(tmp, f"{device}_{size}_{k}.npy")
                for mode in sorted(args.modes, key=lambda m: m != "exact"):  # exact first: others compare to it
                    cfg = dict(size=size, mode=mode, device=device, weights=args.weights, runs=args.runs,
                               seed=args.seed, budget_mb=args.budget_mb, scales=args.scales, photo=photo,
                               coarse_factor=args.coarse_factor, threads=args.threads)
                    extra = ["--save-pred", exact_pred] if mode == "exact" else (
                        ["--compare-to", exact_pred] if os.path.exists(exact_pred) else [])
                    extra += ["--warmup", str(args.warmup)]
                    if args.edge_snap:
                        extra += ["--edge-snap", args.edge_snap]
                    if args.rounds:
                        extra += ["--rounds", args.rounds]
                    if args.grabcut:
                        extra += ["--grabcut", args.grabcut]
                    if args.gpu_memory_gb:
                        extra += ["--gpu-memory-gb", str(args.gpu_memory_gb)]
                    r = child(cfg, extra)
                    results.append(r)
                    print(json.dumps(r), flush=True)
    print()
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "results": results}, f, indent=1)


def photo_pairs(folder, count):
    """`count` image/mask pairs taken evenly from folder/images and folder/masks, as 'image:mask' strings."""
    from pathlib import Path

    images = sorted(p for p in (Path(folder) / "images").iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    pairs = [(p, Path(folder) / "masks" / (p.stem + ".png")) for p in images]
    pairs = [(i, m) for i, m in pairs if m.exists()]
    if not pairs:
        sys.exit(f"--photos {folder}: no images/NAME.jpg with masks/NAME.png found")
    pick = pairs[:: max(1, len(pairs) // max(1, count))][:count]
    return [f"{i}{os.pathsep}{m}" for i, m in pick]


def machine():
    import platform

    import torch

    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


if __name__ == "__main__":
    main()
