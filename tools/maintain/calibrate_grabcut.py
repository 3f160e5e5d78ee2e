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
the photos they are judged on. `--train-every N` adds every N-th training photo to what the gates are fitted on
(never to the folds' table, which stays on development photos): the gates read the model's output, and the model
does no better on its training photos than on new ones, so they are more examples of the same choice.

    python tools/maintain/calibrate_grabcut.py --weights demo --output crm_d2/assets/crm_demo.pth --half
    python tools/maintain/calibrate_grabcut.py --weights demo --output out.pth --half --train-every 8 --workers 2 \
        --cache calib_cache/    # resumable: rerun the same line after a kill
"""
import argparse
import functools
import hashlib
import json
import multiprocessing
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/, for heldout_eval

from heldout_eval import coarse_mask, dev_items, load_photos, training_items  # noqa: E402

from crm_d2.checkpoint import save_checkpoint  # noqa: E402
from crm_d2.commands.common import check_run_settings  # noqa: E402
from crm_d2.grabcut import (LOW_GATE_FEATURES, Gate, GrabCut, gate_features, grabcut_mask,  # noqa: E402
                            photo_gradient)
from crm_d2.io import write_json  # noqa: E402
from crm_d2.metrics import boundary_accuracy, intersection_union  # noqa: E402
from crm_d2.refiner import Refiner  # noqa: E402

FOLDS = 5


TRAIN_SEED = 100_000  # polygon seeds of training photos: apart from the development photos' (their index)


def measure_photo(refiner, seed, image, gts, recipes, cut, low_gain=0.0):
    """One row per mask of one photo: recipe, features, and (i, u, mBA) of the coarse, refined and cut masks;
    with a low gain also the features of the low-gain output and the scores of its cut ("low")."""
    rows = []
    bgr = np.ascontiguousarray(image[..., ::-1])
    gradient = photo_gradient(image)  # one per photo, as the Refiner's gates take it, not one per mask and look
    for recipe in recipes:
        coarse = [coarse_mask(g, recipe, seed) for g in gts]
        probs = refiner.refine_batch(image, coarse, output="prob")
        if low_gain:
            with refiner.model.mask_gain_times(low_gain):
                lows = refiner.refine_batch(image, coarse, output="prob")
        for j, (gt, c, p) in enumerate(zip(gts, coarse, probs)):
            gt, was, p = gt > 127, (c > 127).astype(np.float32), p.astype(np.float32)
            mask = grabcut_mask(bgr, p > 0.5, cut.band, cut.iters)
            score = lambda m: (*intersection_union(m, gt), boundary_accuracy(m, gt))  # noqa: E731
            row = {"photo": seed, "recipe": recipe, "side": max(image.shape[:2]),
                   "features": gate_features(image, p, was, mask, gradient),
                   "coarse": score(was > 0.5), "refined": score(p > 0.5), "cut": score(mask)}
            if low_gain:
                low = lows[j].astype(np.float32)
                low_cut = grabcut_mask(bgr, low > 0.5, cut.band, cut.iters)
                row["low_features"] = np.concatenate([row["features"],
                                                     gate_features(image, low, was, low_cut, gradient)])
                row["low"] = score(low_cut)
            rows.append(row)
    return rows


_worker = {}


def _start_worker(weights, threads):
    torch.set_num_threads(threads)
    _worker["refiner"] = Refiner(weights, device="cpu", grabcut="off")


def _measure_job(job, recipes, cut, low_gain, refiner=None):
    """One photo's rows, with `refiner` or, in a worker process, the worker's own."""
    key, seed, split, item = job
    _, image, gts = next(load_photos([item]))
    if not gts:  # an empty ground truth (load_photos drops empty masks) has no boundary to score
        return key, []
    with torch.no_grad():
        rows = measure_photo(refiner or _worker["refiner"], seed, image, gts, recipes, cut, low_gain)
    return key, [{**r, "split": split} for r in rows]


def photo_jobs(data, every, train_every):
    """(key, seed, split, item) per photo: the development photos, then every `train_every`-th training photo.
    A development photo's seed is its index, which also picks its fold; training photos are never held out
    (the model was trained on them, so they only add to what the gates are fitted on)."""
    jobs = [(f"dev/{it.name}", k, "dev", it) for k, it in enumerate(dev_items(data, every))]
    if train_every:
        jobs += [(f"train/{it.name}", TRAIN_SEED + k, "train", it)
                 for k, it in enumerate(training_items(data, train_every))]
    return jobs


def model_fingerprint(refiner):
    """What the rows depend on: the weights and the refiner's settings, not the gates stored beside them (so that
    writing the new gates into the same file does not invalidate a cache)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(refiner.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    digest.update(f"{refiner.model.cfg}|{refiner.scales}|{refiner.auto_base}|{refiner.rounds}|"
                  f"{refiner.edge_snap}".encode())
    return digest.hexdigest()[:16]


def measure(refiner, jobs, recipes, cut, low_gain=0.0, workers=1, threads=1, cache=None, weights=None,
            photos=None):
    """The rows of every job's photo, in job order. `cache`: a folder keeping each photo's rows as it is
    measured, so that a killed run resumes where it stopped; it refuses rows made under other settings, `photos`
    (what chose the photos and their seeds) included. `workers` > 1: photos are measured in that many processes,
    `threads` torch threads each."""
    done = {}
    if cache:
        cache = Path(cache)
        check_run_settings(cache, {"model": model_fingerprint(refiner), "band": cut.band, "iters": cut.iters,
                                   "low_gain": low_gain, "recipes": list(recipes), "photos": photos or {}})
    path_of = lambda key: cache / (key.replace("/", "_") + ".json")  # noqa: E731
    for key, *_ in jobs if cache else ():
        if path_of(key).is_file():
            done[key] = [_as_arrays(r) for r in json.loads(path_of(key).read_text())]
    todo = [job for job in jobs if job[0] not in done]

    def keep(key, rows):
        done[key] = rows
        if cache:
            write_json(path_of(key), [_as_lists(r) for r in rows])

    progress = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="photos")
    if workers > 1 and todo:
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no forked torch threads
        with ctx.Pool(workers, _start_worker, (weights, threads)) as pool:
            run = functools.partial(_measure_job, recipes=recipes, cut=cut, low_gain=low_gain)
            for key, rows in pool.imap_unordered(run, todo):
                keep(key, rows)
                progress.update()
    else:
        for job in todo:
            keep(*_measure_job(job, recipes, cut, low_gain, refiner))
            progress.update()
    progress.close()
    return [row for job in jobs for row in done[job[0]]]


def _as_lists(row):
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in row.items()}


def _as_arrays(row):
    return {k: np.asarray(v) if k in ("features", "low_features") else
            (tuple(v) if isinstance(v, list) else v) for k, v in row.items()}


def fit_gates(rows, l2, max_side=0, pairs=False):
    """The first gate (cut or not) and, with low-gain rows, the second (the low-gain cut or the first cut),
    fitted on the masks the first gate cuts."""
    x = np.stack([r["features"] for r in rows])
    change = np.array([r["cut"][2] - r["refined"][2] for r in rows])
    gate = Gate.fit(x, change > 0, np.abs(change), l2=l2, max_side=max_side, pairs=pairs)
    if "low" not in rows[0]:
        return gate, None
    cut = gate.logit(x) > 0
    xl = np.stack([r["low_features"] for r in rows])[cut]
    better = np.array([r["low"][2] - r["cut"][2] for r in rows])[cut]
    return gate, Gate.fit(xl, better > 0, np.abs(better), l2=l2, max_side=max_side, names=LOW_GATE_FEATURES,
                          pairs=pairs)


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
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per process (default: torch's own, divided by --workers)")
    p.add_argument("--half", action="store_true", help="store the weights in fp16")
    p.add_argument("--json", help="write the rows' scores and the folds' table here")
    p.add_argument("--train-every", type=int, default=8,
                   help="also fit the gates on every N-th training photo (0: development photos only; default: 8)")
    p.add_argument("--gate", choices=("pairs", "linear"), default="pairs",
                   help="the gates read the features and their products (pairs; default), or the features alone")
    p.add_argument("--workers", type=int, default=1, help="measure photos in N processes (default: 1)")
    p.add_argument("--cache", help="keep each photo's rows in this folder and resume from it (a killed run loses "
                                   "nothing; rows made under other settings are refused)")
    args = p.parse_args(argv)
    if args.workers < 1 or args.train_every < 0:
        p.error("--workers must be at least 1 and --train-every at least 0")
    threads = args.threads or max(1, torch.get_num_threads() // args.workers)
    torch.set_num_threads(threads)
    cut = GrabCut(band=args.band, iters=args.iters)
    pairs = args.gate == "pairs"
    refiner = Refiner(args.weights, device="cpu", grabcut="off")
    low_gain = args.low_gain if refiner.model.cfg.mask_skip else 0.0
    jobs = photo_jobs(args.data, args.every, args.train_every)
    count = {split: sum(job[2] == split for job in jobs) for split in ("dev", "train")}
    look = f"second look at gain x{low_gain:g}" if low_gain else "no second look (no mask skip, or --low-gain 0)"
    print(f"{count['dev']} development and {count['train']} training photos; refiner: scales {refiner.scales}, "
          f"rounds {refiner.rounds}, edge snap {refiner.edge_snap or 'off'}; GrabCut band {cut.band}, iters "
          f"{cut.iters}; {look}", file=sys.stderr)
    with torch.no_grad():
        rows = measure(refiner, jobs, args.recipes, cut, low_gain, args.workers, threads, args.cache, args.weights,
                       {"data": str(Path(args.data).resolve()), "every": args.every, "train_every": args.train_every})
    # folds by development photo; training photos are always on the fitting side, and never in the table
    dev = [r for r in rows if r["split"] == "dev"]
    folds = np.array([r["photo"] % FOLDS for r in dev])
    extra = [r for r in rows if r["split"] == "train"]
    one, two = [None] * len(dev), [None] * len(dev)
    for f in range(FOLDS):
        gate, low_gate = fit_gates([r for r, g in zip(dev, folds) if g != f] + extra, args.l2, pairs=pairs)
        held = np.flatnonzero(folds == f)
        for j, c1, c2 in zip(held, choices([dev[j] for j in held], gate, None),
                             choices([dev[j] for j in held], gate, low_gate)):
            one[j], two[j] = c1, c2
    uses = {"never": ["refined"] * len(dev), "always": ["cut"] * len(dev), "gated (folds)": one}
    if low_gain:
        uses["gated + low gain (folds)"] = two
    results = {name: table(dev, args.recipes, use) for name, use in uses.items()}
    print("IoU / mBA change from the coarse masks on development photos (share cut, of which at the low gain):")
    for name, res in results.items():
        print(f"  {name:26s}" + "  ".join(f"{r} {v['iou']:+.2f} / {v['mba']:+.2f} ({100 * v['cut']:.0f}%, "
                                         f"{100 * v['low']:.0f}%)" for r, v in res.items()))
    largest = max(r["side"] for r in rows)  # the gates are not trusted on larger photos
    gate, low_gate = fit_gates(rows, args.l2, largest, pairs)
    model = refiner.model
    meta = dict(getattr(model, "meta", {}))
    meta["grabcut"] = GrabCut(band=cut.band, iters=cut.iters, gate=gate, low_gain=low_gain, low_gate=low_gate).to_dict()
    meta["grabcut_calibration"] = {"dev_photos": count["dev"], "train_photos": count["train"], "masks": len(rows),
                                   "recipes": args.recipes,
                                   "l2": args.l2, "gate": args.gate, "low_gain": low_gain, "folds": results,
                                   "source": str(args.weights)}
    save_checkpoint(args.output, model, model.cfg, meta=meta, half=args.half)
    print(f"wrote {args.output}: GrabCut {GrabCut.parse(meta['grabcut'])}, for photos up to {largest} px")
    if args.json:
        write_json(args.json, {"folds": results, "rows": [_as_lists(r) for r in rows]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
