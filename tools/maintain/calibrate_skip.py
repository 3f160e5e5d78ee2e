#!/usr/bin/env python
"""Calibrate a trained model on a development split: the mask skip's gain, the rounds and the edge snap, written
into the model.

A model with `mask_skip` adds `mask_gain * mask` to its output logit: the gain says how far it trusts the coarse
mask. Training learns it on the training recipe's masks, many of them poor (polygons, 16x); users mostly feed
better ones, and on those a model that trusts the mask too little moves good boundaries. The edge snap
(`crm_d2.guided`) then pulls the refined boundary onto the photo's colour edges. The two trade against each
other: a lower gain or a stronger snap helps coarse masks and costs good ones; further rounds
(`crm_d2.schedule.Rounds`) carry on refining the masks that are still moving. This tool refines the development
photos under each coarse recipe once per gain multiplier (`--multipliers`) and rounds setting (`--rounds`),
applies each candidate snap (`--snaps`) to those probabilities, and keeps the setting with the highest mean mBA
gain over the recipes (refined minus coarse) among those that lose no more than `--floor` allows (e.g.
`4x=-0.5`: at most 0.5 mBA below good 4x masks); IoU is reported beside.

The development photos are the held-out photos that tools/heldout_eval.py does *not* judge (its 84 photos are
every 3rd held-out item; these are the others, `--every` thins them), so the calibration never sees the photos
the model is judged on, and training never saw either.

    python tools/maintain/calibrate_skip.py --weights runs/crm_demo_ft/model_final.pth --output calibrated.pth
    python tools/maintain/calibrate_skip.py --weights W --output W2 --multipliers 2 2.5 3 --rounds 1 3:0.3 \\
        --snaps off 1:1:0.01 1:2:0.003:0.3 --floor 4x=-0.5 --half

A snap is RADIUS:PASSES:EPS[:MIN_SHIFT] (crm_d2.guided.EdgeSnap) or "off"; rounds are COUNT[:MIN_SHIFT].
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/, for heldout_eval

from heldout_eval import coarse_mask, dev_items, load_photos  # noqa: E402

from crm_d2.checkpoint import save_checkpoint  # noqa: E402
from crm_d2.commands.common import edge_snap_argument, rounds_argument  # noqa: E402
from crm_d2.guided import EdgeSnap, snap_probs  # noqa: E402
from crm_d2.inputs import option_text  # noqa: E402
from crm_d2.metrics import RefinementMetrics  # noqa: E402
from crm_d2.refiner import Refiner  # noqa: E402
from crm_d2.schedule import Rounds  # noqa: E402


def parse_floor(text):
    recipe, _, value = text.partition("=")
    try:
        return recipe, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a floor is RECIPE=DMBA (e.g. 4x=-0.5), got {text!r}") from None


def score(photos, refined, recipes, snap):
    """{recipe: summary} of the stored refinements after `snap`."""
    meters = {r: RefinementMetrics() for r in recipes}
    for (name, image, gts), per_recipe in zip(photos, refined):
        if per_recipe is None:
            continue
        for recipe in recipes:
            coarse, probs = per_recipe[recipe]
            probs = snap_probs(image, probs.copy(), snap, coarse=np.stack(coarse))
            for g, c, p in zip(gts, coarse, probs):
                meters[recipe].update(p > 0.5, g, c, name=name)
    return {r: m.summary() for r, m in meters.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="a crm_d2 checkpoint of a model with mask_skip")
    p.add_argument("--output", required=True, help="where to write the calibrated checkpoint")
    p.add_argument("--data", default="../shared/data/crm-train")
    p.add_argument("--multipliers", nargs="+", type=float, default=[1.0, 1.25, 1.5, 1.75, 2.0])
    p.add_argument("--snaps", nargs="+", type=edge_snap_argument, default=["off"],
                   help="edge snaps to try: RADIUS[:PASSES[:EPS[:MIN_SHIFT]]] or off (default: off only)")
    p.add_argument("--rounds", nargs="+", type=rounds_argument, default=["1"],
                   help="rounds to try: COUNT[:MIN_SHIFT] (default: 1 only)")
    p.add_argument("--floor", nargs="*", type=parse_floor, default=[],
                   help="RECIPE=DMBA: keep only pairs whose mBA gain on RECIPE is at least DMBA")
    p.add_argument("--recipes", nargs="+", default=["4x", "8x", "16x"])
    p.add_argument("--every", type=int, default=6, help="thin the development photos (default: 1 in 6, ~28)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--half", action="store_true", help="write the weights in float16 (as the shipped model)")
    p.add_argument("--json", default=None, help="also write the table here")
    args = p.parse_args(argv)
    snaps = [EdgeSnap.parse(s) for s in args.snaps]
    floors = dict(args.floor)
    unknown = set(floors) - set(args.recipes)
    if unknown:
        raise SystemExit(f"--floor names recipes that are not in --recipes: {sorted(unknown)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    # the GrabCut finish is not searched here: its gate is fitted to the calibrated model afterwards
    # (tools/maintain/calibrate_grabcut.py), since it reads the model's output
    refiner = Refiner(args.weights, device="cpu", edge_snap="off", rounds=1, grabcut="off")
    model = refiner.model
    if not model.cfg.mask_skip:
        raise SystemExit(f"{args.weights}: this model has no mask skip; nothing to calibrate")
    # a calibrated model (the shipped one) is calibrated again from the gain its training learned
    earlier = getattr(model, "meta", {}).get("mask_gain_calibration")
    learned = float(earlier["learned"]) if earlier else float(model.mask_gain)
    photos = list(load_photos(dev_items(args.data, args.every)))
    print(f"{len(photos)} development photos, learned gain {learned:.3f}", file=sys.stderr)
    table = []
    for mult, rounds in tqdm([(m, r) for m in args.multipliers for r in args.rounds], desc="gains x rounds"):
        with torch.no_grad():
            model.mask_gain.fill_(learned * mult)
        refiner.rounds = Rounds.parse(rounds)
        refined = []
        for k, (name, image, gts) in enumerate(photos):  # k seeds the polygons, as in heldout_eval
            if not gts:  # an empty ground truth (load_photos drops empty masks) has no boundary to score
                refined.append(None)
                continue
            per_recipe = {}
            for recipe in args.recipes:
                coarse = [coarse_mask(g, recipe, k) for g in gts]
                per_recipe[recipe] = (coarse, refiner.refine_batch(image, coarse, output="prob"))
            refined.append(per_recipe)
        for snap in snaps:
            res = score(photos, refined, args.recipes, snap)
            gains = {r: res[r]["mba"] - res[r]["coarse_mba"] for r in args.recipes}
            ok = all(gains[r] >= f for r, f in floors.items())
            table.append({"multiplier": mult, "gain": learned * mult, "rounds": refiner.rounds.to_dict(),
                          "snap": snap.to_dict() if snap else None,
                          "mean_mba_gain": float(np.mean(list(gains.values()))), "within_floor": ok,
                          "recipes": res})
            cells = "  ".join(f"{r} {res[r]['iou']:.2f}/{res[r]['mba']:.2f} ({gains[r]:+.2f})" for r in args.recipes)
            print(f"x{mult:<5} rounds {rounds:<6} snap {option_text(snap):<10} "
                  f"mean mBA gain {table[-1]['mean_mba_gain']:+.2f}"
                  f"{'' if ok else ' (below floor)'}  {cells}", flush=True)
    eligible = [row for row in table if row["within_floor"]]
    if not eligible:
        raise SystemExit("no gain, rounds and snap keep within --floor "
                         + " ".join(f"{r}={v:g}" for r, v in floors.items()))
    best = max(eligible, key=lambda row: row["mean_mba_gain"])
    with torch.no_grad():
        model.mask_gain.fill_(best["gain"])
    meta = dict(getattr(model, "meta", {}))
    meta.pop("edge_snap", None)
    meta.pop("rounds", None)
    meta.pop("grabcut", None)  # fitted to the model before this calibration: fit it again
    meta.pop("grabcut_calibration", None)
    if best["snap"]:
        meta["edge_snap"] = best["snap"]
    if best["rounds"]["count"] > 1:
        meta["rounds"] = best["rounds"]
    meta["mask_gain_calibration"] = {
        "learned": learned, "multiplier": best["multiplier"], "edge_snap": best["snap"], "rounds": best["rounds"],
        "criterion": "mean mBA gain over " + "/".join(args.recipes)
        + "".join(f", {r} at least {v:+g}" for r, v in floors.items()),
        "dev_photos": len(photos), "source": str(args.weights)}
    save_checkpoint(args.output, model, model.cfg, meta=meta, half=args.half)
    print(f"wrote {args.output}: gain {learned:.3f} x {best['multiplier']} = {best['gain']:.3f}, rounds "
          f"{Rounds.parse(best['rounds'])}, edge snap {option_text(EdgeSnap.parse(best['snap']))}")
    if args.json:
        Path(args.json).write_text(json.dumps({"learned": learned, "table": table, "best": best}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
