#!/usr/bin/env python
"""Measure where each source's masks lie relative to its photos' edges (crm_d2.train.registration).

    python tools/maintain/label_registration.py --config configs/training/crm_small_skip.yaml      # each data.train source
    python tools/maintain/label_registration.py ../shared/data/crm-train/ccp --every 5    # folders of pairs

Prints, per source, the labels' mean offset (px, x right, y down: what a source's `label_offset` corrects), how
much wider each side is (growth; negative: narrower than the objects) and the two sides' own offsets. A config's
sources are measured on their training part as the config loads them, so a `label_offset` already set there is
applied first and what is printed is what is left.
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

from tqdm import tqdm

from crm_d2.io import atomic_write
from crm_d2.train.config import load_config
from crm_d2.train.data import build_items, load_item
from crm_d2.train.registration import edge_balance, registration


def measure(items, desc="photos"):
    """The Registration of the items' masks as stored, less each source's own `label_offset`. Why not measure the
    moved masks: they are soft, and binarising them rounds a 0.56 px move to a whole pixel."""
    total = None
    for item in tqdm(items, desc=desc, unit="photo", file=sys.stderr):
        image, gt, _ = load_item(dataclasses.replace(item, label_offset=(0.0, 0.0)))
        b = edge_balance(image, gt)
        total = b if total is None else total + b
    r = registration(total)
    done = items[0].label_offset if items else (0.0, 0.0)
    left = lambda v: tuple(a - d for a, d in zip(v, done))  # noqa: E731  (a move shifts both sides alike)
    return dataclasses.replace(r, offset=left(r.offset), begins=left(r.begins), ends=left(r.ends))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="*", help="folders of image/mask pairs (crm_d2.train.data's 'pairs' layout)")
    p.add_argument("--config", default=None, help="measure this training config's data.train sources instead")
    p.add_argument("--every", type=int, default=1, help="take every N-th photo of each source")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if bool(args.folders) == bool(args.config):
        p.error("give folders of pairs or --config, not both or neither")
    if args.every < 1:
        p.error(f"--every must be at least 1, got {args.every}")
    if args.config:
        cfg = load_config(args.config)
        specs = [s for s in cfg["data"]["train"] if s.get("type", "pairs") != "synthetic"]
        base_dir, empty = cfg.get("_base_dir"), cfg["data"]["empty"]
    else:
        specs, base_dir, empty = [{"type": "pairs", "root": f} for f in args.folders], None, "skip"
    rows, out = [], {}
    for spec in specs:
        items = build_items([spec], "train", base_dir, empty)[:: args.every]
        name = str(spec.get("root", spec.get("type")))
        r = measure(items, desc=name.rstrip("/").split("/")[-1])
        out[name] = {"photos": len(items), **dataclasses.asdict(r)}
        f = lambda v: " ".join(f"{x:+.2f}" for x in v)  # noqa: E731
        rows.append(f"| {name} | {len(items)} | {f(r.offset)} | {f(r.growth)} | {f(r.begins)} | {f(r.ends)} |")
    print("| source | photos | offset x y | growth x y | begins x y | ends x y |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("(px; offset: where the labels lie, x right / y down, i.e. label_offset: [x, y]; growth: per side, "
          "negative = narrower than the objects; nan: no edges, or more than about a pixel off)")
    if args.json:
        atomic_write(Path(args.json), lambda tmp: Path(tmp).write_text(json.dumps(out, indent=1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
