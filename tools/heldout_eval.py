#!/usr/bin/env python
"""Judge a CRM model on real held-out photos: IoU / mBA of the coarse and the refined masks, per coarse recipe.

    python tools/heldout_eval.py --weights demo                     # every default, 84 held-out photos
    python tools/heldout_eval.py --weights W.pth --scales 0.5 1.0 --every 1 --json out.json
    python tools/heldout_eval.py --weights demo --regions --upscale 2048 --recipes 8x   # 2K, many ROIs
    python tools/heldout_eval.py --weights demo --write-big heldout_big/   # BIG folders for crm-d2 refine/eval

The photos are the held-out split of ../shared/data/crm-train that the training configs never read (every 10th
item of each source, sorted by name; `--every 3` takes every 3rd of those, 84 photos). Coarse masks:
`Nx` = the GT seen by an N-times lower-resolution segmenter (`lowres_protocol`: INTER_AREA down, INTER_LINEAR
up, threshold 127); `polygon` = the released training recipe (CascadePSP's), seeded per photo. Refined masks
are binarised as `crm-d2 eval` does (p > 0.5). `--regions` scores every CCP label region (hair, face, each
garment) as its own mask, refined together in ROI mode as the panoptic path does; `--upscale L` scales photos
(bicubic) and masks (soft, then 0.5) to a long side of L first ("upscaled photos": there is no real 2K data).
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from crm_d2.commands.common import add_scales_argument, edge_snap_argument, grabcut_argument, rounds_argument
from crm_d2.commands.demo import SAMPLE as DEMO_SAMPLE
from crm_d2.io import atomic_write, read_image, read_mask, write_image, write_png
from crm_d2.inputs import option_text
from crm_d2.metrics import RefinementMetrics
from crm_d2.pictures import mask_panel, side_by_side
from crm_d2.refiner import Refiner
from crm_d2.train.data import build_items
from crm_d2.train.perturb import lowres_protocol, polygon_perturb
from crm_d2.train.registration import move_photo

SOURCES = ("ecssd", "pascal-s", "ccp")
RECIPES = ("4x", "8x", "16x", "polygon")
MIN_REGION = 0.002  # --regions: label regions smaller than this share of the image are not scored


def heldout_split(root, part="val"):
    """Every held-out item of the sources (every 10th of each, sorted by name): no training config reads them.
    part="train": the other items, which the training configs read."""
    specs = [{"type": "pairs", "root": str(Path(root) / s), "holdout_every": 10} for s in SOURCES
             if (Path(root) / s).is_dir()]
    if not specs:
        raise FileNotFoundError(f"no {'/'.join(SOURCES)} folders in {root}")
    return build_items(specs, part)


def demo_photos():
    """Names ("ccp/0003") of the photos `crm-d2 demo` shows, which the training configs leave out (`exclude`)."""
    return {f.stem.replace("_", "/", 1) for f in (DEMO_SAMPLE / "images").glob("*.jpg")}


def training_items(root, every=1):
    """Every `every`-th of the items the training configs read (tools/maintain/calibrate_grabcut.py --train-every): the
    training part of the split, thinned, then without the demo's photos (after thinning, so that dropping them
    does not change which other photos are taken)."""
    shown = demo_photos()
    return [it for it in heldout_split(root, "train")[::every] if it.name not in shown]


JUDGED_EVERY = 3  # the photos this tool judges: every 3rd held-out item (84); the others are development photos


def heldout_items(root, every=JUDGED_EVERY):
    """The photos this tool judges (with the default `every`)."""
    return heldout_split(root)[::every]


def dev_items(root, every=6):
    """Development photos (tools/maintain/calibrate_skip.py): the held-out items this tool does not judge (with the
    default every=3), thinned to every `every`-th."""
    return [it for i, it in enumerate(heldout_split(root)) if i % JUDGED_EVERY != 0][::every]


def coarse_mask(gt, recipe, seed):
    if recipe == "polygon":
        return polygon_perturb(gt, np.random.default_rng([seed, 0xC0A]))
    if not recipe.endswith("x"):
        raise ValueError(f"unknown recipe {recipe!r}: use Nx (e.g. 8x) or polygon")
    return lowres_protocol(gt, float(recipe[:-1]))


def upscale(image, masks, long_side):
    h, w = image.shape[:2]
    k = long_side / max(h, w)
    size = (round(w * k), round(h * k))
    image = cv2.resize(image, size, interpolation=cv2.INTER_CUBIC)
    masks = [np.where(cv2.resize((m > 127).astype(np.float32), size, interpolation=cv2.INTER_LINEAR) >= 0.5,
                      255, 0).astype(np.uint8) for m in masks]
    return image, masks


def region_masks(item):
    """The CCP label map's regions (label > 0) as 0/255 masks; the silhouette for other sources."""
    labels = item.mask.parent.parent / "labels" / item.mask.name
    if not labels.exists():
        return [read_mask(item.mask)]
    lab = read_mask(labels)
    return [np.where(lab == v, 255, 0).astype(np.uint8) for v in np.unique(lab) if v != 0
            and np.count_nonzero(lab == v) >= MIN_REGION * lab.size]


def load_photos(items, regions=False, upscale_to=None, label_offsets=None):
    """(name, image, ground-truth masks) per item, in order (a photo's index seeds its polygon masks); `regions`:
    CCP label regions instead of the silhouette; `upscale_to`: scale to this long side first; `label_offsets`:
    {source: (dx, dy)}, where that source's labels lie against its photos' edges (tools/maintain/label_registration.py):
    its photos are moved by as much, so that they line up with the labels, which stay binary."""
    for item in items:
        image = read_image(item.image)
        offset = (label_offsets or {}).get(item.name.split("/")[0])
        if offset:
            image = move_photo(image, *offset)
        gts = region_masks(item) if regions else [read_mask(item.mask)]
        if upscale_to:
            image, gts = upscale(image, gts, upscale_to)
        yield item.name, image, [g for g in gts if g.any()]


def label_offset_argument(text):
    source, _, value = text.partition("=")
    try:
        dx, dy = (float(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use SOURCE=DX,DY, e.g. ccp=0.56,0.25") from None
    if source not in SOURCES:
        raise argparse.ArgumentTypeError(f"{text!r}: SOURCE must be one of {', '.join(SOURCES)}")
    return source, (dx, dy)


def crm_label(refiner):
    """The refined panel's title: "CRM", plus the photo-guided steps after the model when set."""
    cut = ["gated GrabCut" if refiner.grabcut.gate else "GrabCut"] if refiner.grabcut else []
    return " + ".join(["CRM"] + (["edge snap"] if refiner.edge_snap else []) + cut)


def evaluate(refiner, photos, recipes, regions=False, write_big=None, scales=None, pictures=None,
             picture_names=(), progress=True, max_side=None, total=None):
    """{recipe: {"all": summary, source: summary}} of coarse vs refined IoU/mBA (percent) on `load_photos`'
    photos. `regions`: refine each photo's masks together in ROI mode. `pictures`: a folder for image | coarse |
    CRM | ground truth pictures of the photos named in `picture_names` (e.g. ccp/0011). `total`: the number of
    photos, for the progress bar when `photos` is a generator."""
    meters = {r: {"all": RefinementMetrics()} for r in recipes}
    for k, (photo, image, gts) in enumerate(tqdm(photos, total=total, desc="held-out", unit="photo",
                                                  file=sys.stderr, disable=not progress)):
        if not gts:
            continue
        source = photo.split("/")[0]
        for recipe in recipes:
            coarse = [coarse_mask(g, recipe, k) for g in gts]
            probs = refiner.refine_batch(image, coarse, roi=regions, scales=scales, max_side=max_side,
                                         output="prob")
            if pictures and photo in picture_names:
                write_png(Path(pictures) / f"{photo.replace('/', '_')}_{recipe}.png",
                          side_by_side(image, [mask_panel(f"coarse {recipe}", *(c > 127 for c in coarse)),
                                               mask_panel(crm_label(refiner), *(p > 0.5 for p in probs)),
                                               mask_panel("ground truth", *(g > 127 for g in gts))]))
            for j, (g, c, p) in enumerate(zip(gts, coarse, probs)):
                name = photo.replace("/", "_") + (f"_r{j}" if regions else "")
                for key in ("all", source):
                    meters[recipe].setdefault(key, RefinementMetrics()).update(p, g, c, name=name)
                if write_big:
                    folder = Path(write_big) / recipe
                    folder.mkdir(parents=True, exist_ok=True)
                    write_png(folder / f"{name}_gt.png", g, rgb=False)
                    write_png(folder / f"{name}_seg.png", c, rgb=False)
                    if not (folder / f"{name}_im.jpg").exists():
                        write_image(folder / f"{name}_im.jpg", image)
    return {r: {key: m.summary() for key, m in ms.items()} for r, ms in meters.items()}


def table(results, title=""):
    f = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"  # noqa: E731
    lines = [title, "", "| coarse | subset | n | coarse IoU | coarse mBA | refined IoU | refined mBA | dIoU | dmBA |",
             "|---|---|---|---|---|---|---|---|---|"] if title else []
    for recipe, parts in results.items():
        for key, s in parts.items():
            d_iou, d_mba = s["iou"] - s["coarse_iou"], s["mba"] - s["coarse_mba"]
            bold = "**" if key == "all" else ""
            lines.append(f"| {recipe} | {key} | {s['n']} | {f(s['coarse_iou'])} | {f(s['coarse_mba'])} | "
                         f"{bold}{f(s['iou'])}{bold} | {bold}{f(s['mba'])}{bold} | {d_iou:+.2f} | {d_mba:+.2f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", default="demo", help="'demo', a crm_d2 checkpoint or the authors' file")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/crm-train"),
                   help="the crm-train folder")
    p.add_argument("--every", type=int, default=JUDGED_EVERY, help="take every N-th held-out photo (1 = all 251)")
    p.add_argument("--limit", type=int, default=0, help="at most this many photos (0 = no limit)")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), help="coarse recipes: Nx and/or polygon")
    add_scales_argument(p)
    p.add_argument("--max-side", type=int, default=None, help="cap the encoder's input long side (Refiner's max_side)")
    p.add_argument("--regions", action="store_true", help="score CCP label regions, refined in ROI mode")
    p.add_argument("--upscale", type=int, default=None, help="scale photos to this long side first")
    p.add_argument("--fast", action="store_true", help="fast mode")
    p.add_argument("--edge-snap", default=None, metavar="R:P:EPS", type=edge_snap_argument,
                   help="Refiner's edge_snap: RADIUS[:PASSES[:EPS[:MIN_SHIFT]]] or off (default: the model's own)")
    p.add_argument("--rounds", default=None, metavar="COUNT[:MIN_SHIFT]", type=rounds_argument,
                   help="Refiner's rounds (default: the model's own)")
    p.add_argument("--grabcut", default=None, metavar="BAND[:ITERS[:MIN_SHIFT]]", type=grabcut_argument,
                   help="Refiner's grabcut (default: the model's own)")
    p.add_argument("--label-offset", nargs="+", default=[], metavar="SOURCE=DX,DY", type=label_offset_argument,
                   help="move SOURCE's photos onto its labels (e.g. ccp=0.56,0.25), an analysis of how much a "
                        "registration error costs; not the protocol")
    p.add_argument("--device", default=None)
    p.add_argument("--write-big", default=None, help="also write BIG-layout folders (one per recipe)")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    p.add_argument("--pictures", default=None, help="write image | coarse | CRM | ground truth PNGs here")
    p.add_argument("--picture-names", nargs="+", default=[], help="photos to draw, e.g. ccp/0011")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    refiner = Refiner(args.weights, device=args.device, mode="fast" if args.fast else "exact",
                      edge_snap=args.edge_snap, rounds=args.rounds, grabcut=args.grabcut)
    items = heldout_items(args.data, args.every)
    if args.regions:
        items = [it for it in items if it.name.startswith("ccp/")]
    if args.limit:
        items = items[: args.limit]
    t0 = time.perf_counter()
    offsets = dict(args.label_offset)
    photos = load_photos(items, args.regions, args.upscale, offsets)
    results = evaluate(refiner, photos, args.recipes, args.regions, args.write_big, args.scales, args.pictures,
                       set(args.picture_names), max_side=args.max_side, total=len(items))
    took = time.perf_counter() - t0
    what = (f"weights {args.weights}, scales {args.scales or refiner.scales}, {len(items)} held-out photos"
            f"{', CCP regions in ROI mode' if args.regions else ''}"
            f"{f', upscaled to {args.upscale} px' if args.upscale else ''}{', fast mode' if args.fast else ''}"
            f"{f', encoder at most {args.max_side} px' if args.max_side else ''}"
            f"{''.join(f', {k} photos moved by {v[0]:g},{v[1]:g} px' for k, v in offsets.items())}"
            f", edge snap {option_text(refiner.edge_snap)}, rounds {refiner.rounds}"
            f", grabcut {option_text(refiner.grabcut)}")
    print(table(results, f"Held-out IoU / mBA (percent), {what}; {took:.0f} s"))
    if args.json:
        out = {"weights": str(args.weights), "scales": args.scales or refiner.scales, "photos": len(items),
               "regions": args.regions, "upscale": args.upscale, "fast": args.fast, "max_side": args.max_side,
               "edge_snap": option_text(refiner.edge_snap), "rounds": str(refiner.rounds),
               "grabcut": option_text(refiner.grabcut), "label_offsets": offsets,
               "seconds": took,
               "results": results}
        atomic_write(Path(args.json), lambda tmp: Path(tmp).write_text(json.dumps(out, indent=1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
