#!/usr/bin/env python
"""Calibrate the mask skip's gain of a trained model on a development split, and write the calibrated model.

A model with `mask_skip` adds `mask_gain * mask` to its output logit: the gain says how far it trusts the coarse
mask. Training learns it on the training recipe's masks, many of them poor (polygons, 16x); users mostly feed
better ones, and on those a model that trusts the mask too little moves good boundaries. This tool scales the
gain by each multiplier of `--multipliers`, refines the development photos under each coarse recipe, and keeps
the multiplier with the highest mean mBA gain over the recipes (refined minus coarse); IoU is reported beside.

The development photos are the held-out photos that tools/heldout_eval.py does *not* judge (its 84 photos are
every 3rd held-out item; these are the others, `--every` thins them), so the calibration never sees the photos
the model is judged on, and training never saw either.

    python tools/calibrate_skip.py --weights runs/crm_demo_ft/model_final.pth --output calibrated.pth
    python tools/calibrate_skip.py --weights W --output W2 --multipliers 1 1.25 1.5 2 --recipes 4x 8x 16x --half
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from heldout_eval import dev_items, evaluate, load_photos  # noqa: E402

from crm_d2.checkpoint import save_checkpoint  # noqa: E402
from crm_d2.refiner import Refiner  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="a crm_d2 checkpoint of a model with mask_skip")
    p.add_argument("--output", required=True, help="where to write the calibrated checkpoint")
    p.add_argument("--data", default="../shared/data/crm-train")
    p.add_argument("--multipliers", nargs="+", type=float, default=[1.0, 1.25, 1.5, 1.75, 2.0])
    p.add_argument("--recipes", nargs="+", default=["4x", "8x", "16x"])
    p.add_argument("--every", type=int, default=6, help="thin the development photos (default: 1 in 6, ~28)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--half", action="store_true", help="write the weights in float16 (as the shipped model)")
    p.add_argument("--json", default=None, help="also write the table here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    refiner = Refiner(args.weights, device="cpu")
    model = refiner.model
    if not model.cfg.mask_skip:
        raise SystemExit(f"{args.weights}: this model has no mask skip; nothing to calibrate")
    learned = float(model.mask_gain)
    photos = list(load_photos(dev_items(args.data, args.every)))
    print(f"{len(photos)} development photos, learned gain {learned:.3f}", file=sys.stderr)
    table = []
    for mult in tqdm(args.multipliers, desc="gains"):
        with torch.no_grad():
            model.mask_gain.fill_(learned * mult)
        res = {r: parts["all"] for r, parts in evaluate(refiner, photos, args.recipes, progress=False).items()}
        gain = float(np.mean([res[r]["mba"] - res[r]["coarse_mba"] for r in args.recipes]))
        table.append({"multiplier": mult, "gain": learned * mult, "mean_mba_gain": gain, "recipes": res})
        cells = "  ".join(f"{r} {res[r]['iou']:.2f}/{res[r]['mba']:.2f} (coarse {res[r]['coarse_iou']:.2f}/"
                          f"{res[r]['coarse_mba']:.2f})" for r in args.recipes)
        print(f"x{mult:<5} gain {learned * mult:.3f}  mean mBA gain {gain:+.2f}  {cells}", flush=True)
    best = max(table, key=lambda row: row["mean_mba_gain"])
    with torch.no_grad():
        model.mask_gain.fill_(best["gain"])
    meta = dict(getattr(model, "meta", {}))
    meta["mask_gain_calibration"] = {
        "learned": learned, "multiplier": best["multiplier"], "criterion": "mean mBA gain over " +
        "/".join(args.recipes), "dev_photos": len(photos), "source": str(args.weights)}
    save_checkpoint(args.output, model, model.cfg, meta=meta, half=args.half)
    print(f"wrote {args.output}: gain {learned:.3f} x {best['multiplier']} = {best['gain']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"learned": learned, "table": table, "best": best}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
