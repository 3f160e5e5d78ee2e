#!/usr/bin/env python
"""Fit a model's GrabCut gate on development photos and write it into the model (`meta["grabcut"]`).

The GrabCut finish (`crm_d2.grabcut`) sharpens masks that are still far off and costs good masks whose labels do
not follow the photo's colour edges. The gate (`crm_d2.grabcut.Gate`) decides per mask from what can be seen
without ground truth (`gate_features`). This tool refines the development photos under each coarse recipe with
the model's own settings and no GrabCut, cuts each refined mask, scores both against the ground truth, and fits a
logistic model of "the cut raised the mask's boundary accuracy", each mask weighted by how much its mBA changed.
It prints what the gate does on photos it was not fit on (5 folds by photo) next to never and always cutting,
then writes the gate fit on all of them, with the largest photo side it saw: larger photos are not cut.

The development photos are the held-out photos that tools/heldout_eval.py does *not* judge (its 84 photos are
every 3rd held-out item; these are the other 167, `--every` thins them), so neither the gate nor the model saw
the photos they are judged on.

    python tools/calibrate_grabcut.py --weights demo --output crm_d2/assets/crm_demo.pth --half
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from heldout_eval import coarse_mask, dev_items, load_photos  # noqa: E402

from crm_d2.checkpoint import save_checkpoint  # noqa: E402
from crm_d2.grabcut import Gate, GrabCut, gate_features, grabcut_mask  # noqa: E402
from crm_d2.metrics import boundary_accuracy, intersection_union  # noqa: E402
from crm_d2.refiner import Refiner  # noqa: E402

FOLDS = 5


def measure(refiner, photos, recipes, cut):
    """One row per mask: recipe, photo index, features, and (i, u, mBA) of the coarse, refined and cut masks."""
    rows = []
    for k, (name, image, gts) in enumerate(tqdm(photos, desc="development photos")):
        if not gts:  # an empty ground truth (load_photos drops empty masks) has no boundary to score
            continue
        bgr = np.ascontiguousarray(image[..., ::-1])
        for recipe in recipes:
            coarse = [coarse_mask(g, recipe, k) for g in gts]
            probs = refiner.refine_batch(image, coarse, output="prob")
            for gt, c, p in zip(gts, coarse, probs):
                gt, was, p = gt > 127, (c > 127).astype(np.float32), p.astype(np.float32)
                mask = grabcut_mask(bgr, p > 0.5, cut.band, cut.iters)
                scores = {n: (*intersection_union(m, gt), boundary_accuracy(m, gt))
                          for n, m in (("coarse", was > 0.5), ("refined", p > 0.5), ("cut", mask))}
                rows.append({"photo": k, "recipe": recipe, "features": gate_features(image, p, was, mask),
                             **scores})
    return rows


def table(rows, recipes, use):
    """IoU / mBA change from coarse per recipe when each mask takes `use[j]` ("refined" or "cut")."""
    out = {}
    for recipe in recipes:
        sel = [j for j, r in enumerate(rows) if r["recipe"] == recipe]
        def pooled(name_of):
            iu = np.array([rows[j][name_of(j)][:2] for j in sel], np.float64)
            return 100 * iu[:, 0].sum() / iu[:, 1].sum(), 100 * np.mean([rows[j][name_of(j)][2] for j in sel])
        ci, cb = pooled(lambda j: "coarse")
        ni, nb = pooled(lambda j: use[j])
        out[recipe] = {"iou": float(ni - ci), "mba": float(nb - cb),
                       "cut": float(np.mean([use[j] == "cut" for j in sel]))}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", default="demo", help="'demo' or a checkpoint (default: demo)")
    p.add_argument("--output", required=True, help="where to write the model with its gate")
    p.add_argument("--data", default="../shared/data/crm-train")
    p.add_argument("--every", type=int, default=1, help="take every N-th development photo (default: all 167)")
    p.add_argument("--band", type=int, default=1, help="GrabCut band in px (default: 1)")
    p.add_argument("--iters", type=int, default=1, help="GrabCut iterations (default: 1)")
    p.add_argument("--l2", type=float, default=10.0, help="L2 penalty of the logistic gate (default: 10)")
    p.add_argument("--recipes", nargs="+", default=["4x", "8x", "16x", "polygon"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    p.add_argument("--half", action="store_true", help="store the weights in fp16")
    p.add_argument("--json", help="write the rows' scores and the folds' table here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cut = GrabCut(band=args.band, iters=args.iters)
    refiner = Refiner(args.weights, device="cpu", grabcut="off")
    photos = list(load_photos(dev_items(args.data, args.every)))
    print(f"{len(photos)} development photos; refiner: scales {refiner.scales}, rounds {refiner.rounds}, "
          f"edge snap {refiner.edge_snap or 'off'}; GrabCut band {cut.band}, iters {cut.iters}", file=sys.stderr)
    with torch.no_grad():
        rows = measure(refiner, photos, args.recipes, cut)
    x = np.stack([r["features"] for r in rows])
    change = np.array([r["cut"][2] - r["refined"][2] for r in rows])
    folds = np.array([r["photo"] % FOLDS for r in rows])
    logit = np.zeros(len(rows))
    for f in range(FOLDS):
        gate = Gate.fit(x[folds != f], change[folds != f] > 0, np.abs(change[folds != f]), l2=args.l2)
        logit[folds == f] = gate.logit(x[folds == f])
    results = {name: table(rows, args.recipes, use) for name, use in (
        ("never", ["refined"] * len(rows)), ("always", ["cut"] * len(rows)),
        ("gated (folds)", ["cut" if v > 0 else "refined" for v in logit]))}
    print("IoU / mBA change from the coarse masks (share cut):")
    for name, res in results.items():
        print(f"  {name:14s}" + "  ".join(f"{r} {v['iou']:+.2f} / {v['mba']:+.2f} ({100 * v['cut']:.0f}%)"
                                         for r, v in res.items()))
    largest = max(max(image.shape[:2]) for _, image, _ in photos)  # the gate is not trusted on larger photos
    gate = Gate.fit(x, change > 0, np.abs(change), l2=args.l2, max_side=largest)
    model = refiner.model
    meta = dict(getattr(model, "meta", {}))
    meta["grabcut"] = GrabCut(band=cut.band, iters=cut.iters, gate=gate).to_dict()
    meta["grabcut_calibration"] = {"dev_photos": len(photos), "masks": len(rows), "recipes": args.recipes,
                                   "l2": args.l2, "folds": results, "source": str(args.weights)}
    save_checkpoint(args.output, model, model.cfg, meta=meta, half=args.half)
    print(f"wrote {args.output}: GrabCut {GrabCut.parse(meta['grabcut'])}, for photos up to {largest} px")
    if args.json:
        Path(args.json).write_text(json.dumps({"folds": results, "rows": [
            {**{k: v for k, v in r.items() if k != "features"}, "features": r["features"].tolist()} for r in rows]},
            indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
