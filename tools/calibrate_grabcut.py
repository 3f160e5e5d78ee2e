#!/usr/bin/env python
"""Fit a model's GrabCut gate on development photos and write it into the model (`meta["grabcut"]`).

The GrabCut finish (`crm_d2.grabcut`) sharpens masks that are still far off and costs good masks whose labels do
not follow the photo's colour edges. The gate (`crm_d2.grabcut.Gate`) decides per mask from what can be seen
without ground truth (`gate_features`). This tool refines the development photos under each coarse recipe with
the model's own settings and no GrabCut, cuts each refined mask, scores both against the ground truth, and fits a
logistic model of "the cut raised the mask's boundary accuracy", each mask weighted by how much its mBA changed.
It prints what the gate does on photos it was not fit on (5 folds by photo) next to never and always cutting,
then writes the gate fit on all of them, with the largest photo side it saw: larger photos are not cut.

`--low-gain M` (a model with a mask skip; 0.5 by default) adds the second look: each mask is also refined with the
skip's gain times M and that output cut too, and a second gate (`low_gate`), fitted on the masks the first gate
cuts, learns when that cut beats the first one. A mask the gate finds far off is then refined trusting its coarse
mask less, which is what such a mask needs and what a good one must not get.

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
from crm_d2.grabcut import LOW_GATE_FEATURES, Gate, GrabCut, gate_features, grabcut_mask  # noqa: E402
from crm_d2.metrics import boundary_accuracy, intersection_union  # noqa: E402
from crm_d2.refiner import Refiner  # noqa: E402

FOLDS = 5


def measure(refiner, photos, recipes, cut, low_gain=0.0):
    """One row per mask: recipe, photo index, features, and (i, u, mBA) of the coarse, refined and cut masks;
    with a low gain also the features of the low-gain output and the scores of its cut ("low")."""
    rows = []
    for k, (name, image, gts) in enumerate(tqdm(photos, desc="development photos")):
        if not gts:  # an empty ground truth (load_photos drops empty masks) has no boundary to score
            continue
        bgr = np.ascontiguousarray(image[..., ::-1])
        for recipe in recipes:
            coarse = [coarse_mask(g, recipe, k) for g in gts]
            probs = refiner.refine_batch(image, coarse, output="prob")
            if low_gain:
                with refiner.model.mask_gain_times(low_gain):
                    lows = refiner.refine_batch(image, coarse, output="prob")
            for j, (gt, c, p) in enumerate(zip(gts, coarse, probs)):
                gt, was, p = gt > 127, (c > 127).astype(np.float32), p.astype(np.float32)
                mask = grabcut_mask(bgr, p > 0.5, cut.band, cut.iters)
                score = lambda m: (*intersection_union(m, gt), boundary_accuracy(m, gt))  # noqa: E731
                row = {"photo": k, "recipe": recipe, "features": gate_features(image, p, was, mask),
                       "coarse": score(was > 0.5), "refined": score(p > 0.5), "cut": score(mask)}
                if low_gain:
                    low = lows[j].astype(np.float32)
                    low_cut = grabcut_mask(bgr, low > 0.5, cut.band, cut.iters)
                    row["low_features"] = np.concatenate([row["features"], gate_features(image, low, was, low_cut)])
                    row["low"] = score(low_cut)
                rows.append(row)
    return rows


def fit_gates(rows, l2, max_side=0):
    """The first gate (cut or not) and, with low-gain rows, the second (the low-gain cut or the first cut),
    fitted on the masks the first gate cuts."""
    x = np.stack([r["features"] for r in rows])
    change = np.array([r["cut"][2] - r["refined"][2] for r in rows])
    gate = Gate.fit(x, change > 0, np.abs(change), l2=l2, max_side=max_side)
    if "low" not in rows[0]:
        return gate, None
    cut = gate.logit(x) > 0
    xl = np.stack([r["low_features"] for r in rows])[cut]
    better = np.array([r["low"][2] - r["cut"][2] for r in rows])[cut]
    return gate, Gate.fit(xl, better > 0, np.abs(better), l2=l2, max_side=max_side, names=LOW_GATE_FEATURES)


def choices(rows, gate, low_gate):
    """What each mask takes under the gates: "refined", "cut" or "low"."""
    out = []
    for r in rows:
        if gate.logit(r["features"]) <= 0:
            out.append("refined")
        else:
            out.append("low" if low_gate is not None and low_gate.logit(r["low_features"]) > 0 else "cut")
    return out


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
                       "cut": float(np.mean([use[j] != "refined" for j in sel])),
                       "low": float(np.mean([use[j] == "low" for j in sel]))}
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
    p.add_argument("--low-gain", type=float, default=0.5,
                   help="the second look's skip gain multiplier; 0: no second look (default: 0.5, for a model "
                        "with a mask skip)")
    p.add_argument("--recipes", nargs="+", default=["4x", "8x", "16x", "polygon"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    p.add_argument("--half", action="store_true", help="store the weights in fp16")
    p.add_argument("--json", help="write the rows' scores and the folds' table here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cut = GrabCut(band=args.band, iters=args.iters)
    refiner = Refiner(args.weights, device="cpu", grabcut="off")
    low_gain = args.low_gain if refiner.model.cfg.mask_skip else 0.0
    photos = list(load_photos(dev_items(args.data, args.every)))
    look = f"second look at gain x{low_gain:g}" if low_gain else "no second look (no mask skip, or --low-gain 0)"
    print(f"{len(photos)} development photos; refiner: scales {refiner.scales}, rounds {refiner.rounds}, "
          f"edge snap {refiner.edge_snap or 'off'}; GrabCut band {cut.band}, iters {cut.iters}; {look}",
          file=sys.stderr)
    with torch.no_grad():
        rows = measure(refiner, photos, args.recipes, cut, low_gain)
    folds = np.array([r["photo"] % FOLDS for r in rows])
    one, two = [None] * len(rows), [None] * len(rows)
    for f in range(FOLDS):
        train = [r for r, g in zip(rows, folds) if g != f]
        gate, low_gate = fit_gates(train, args.l2)
        held = np.flatnonzero(folds == f)
        for j, c1, c2 in zip(held, choices([rows[j] for j in held], gate, None),
                             choices([rows[j] for j in held], gate, low_gate)):
            one[j], two[j] = c1, c2
    uses = {"never": ["refined"] * len(rows), "always": ["cut"] * len(rows), "gated (folds)": one}
    if low_gain:
        uses["gated + low gain (folds)"] = two
    results = {name: table(rows, args.recipes, use) for name, use in uses.items()}
    print("IoU / mBA change from the coarse masks (share cut, of which at the low gain):")
    for name, res in results.items():
        print(f"  {name:26s}" + "  ".join(f"{r} {v['iou']:+.2f} / {v['mba']:+.2f} ({100 * v['cut']:.0f}%, "
                                         f"{100 * v['low']:.0f}%)" for r, v in res.items()))
    largest = max(max(image.shape[:2]) for _, image, _ in photos)  # the gate is not trusted on larger photos
    gate, low_gate = fit_gates(rows, args.l2, largest)
    model = refiner.model
    meta = dict(getattr(model, "meta", {}))
    meta["grabcut"] = GrabCut(band=cut.band, iters=cut.iters, gate=gate, low_gain=low_gain, low_gate=low_gate).to_dict()
    meta["grabcut_calibration"] = {"dev_photos": len(photos), "masks": len(rows), "recipes": args.recipes,
                                   "l2": args.l2, "low_gain": low_gain, "folds": results, "source": str(args.weights)}
    save_checkpoint(args.output, model, model.cfg, meta=meta, half=args.half)
    print(f"wrote {args.output}: GrabCut {GrabCut.parse(meta['grabcut'])}, for photos up to {largest} px")
    if args.json:
        Path(args.json).write_text(json.dumps({"folds": results, "rows": [
            {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in r.items()} for r in rows]},
            indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
