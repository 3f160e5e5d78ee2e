#!/usr/bin/env python
"""Pack a config's training items into a compact folder, to carry them to a machine that has no copy of the data
(a GPU lent for minutes, with a size limit on what travels).

Each source's training part (its `holdout_every` split and `exclude` already applied, so nothing held out
travels) becomes OUT/NAME/images + OUT/NAME/masks: images re-encoded (`--format webp|jpg`, `--quality`) or copied
as they are (`--format copy`), masks as 1-bit PNG (read back as 0/255). OUT/sources.yaml holds the
`data.train` list for the packed copy (with each source's `label_offset`), one line, ready for an override:

    python tools/maintain/pack_data.py --config configs/training/crm_r50_skip.yaml --out .gpu/data --only ccp --format copy
    crm-d2 train --config configs/training/crm_r50_skip.yaml "data.train=$(cat .gpu/data/sources.yaml)"

Paths in sources.yaml are OUT/NAME as given to --out (relative to where training runs), or `--root-as DIR`.
"""
import argparse
import shutil
import sys
from pathlib import Path

import cv2
import yaml
from tqdm import tqdm

from crm_d2.io import atomic_write, imread, read_mask
from crm_d2.train.config import load_config
from crm_d2.train.data import build_items

ENCODERS = {"webp": (".webp", cv2.IMWRITE_WEBP_QUALITY), "jpg": (".jpg", cv2.IMWRITE_JPEG_QUALITY)}


def pack_source(items, folder, fmt, quality):
    """Write the items into folder/images and folder/masks; returns the bytes written."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    total = 0
    for item in tqdm(items, desc=folder.name, unit="pair", file=sys.stderr):
        stem = item.name.split("/")[-1]
        if fmt == "copy":
            dst = folder / "images" / f"{stem}{item.image.suffix.lower()}"
            atomic_write(dst, lambda tmp, src=item.image: shutil.copyfile(src, tmp))
        else:
            ext, flag = ENCODERS[fmt]
            ok, buf = cv2.imencode(ext, imread(item.image, cv2.IMREAD_COLOR), [flag, quality])  # BGR in, BGR out
            if not ok:
                raise RuntimeError(f"cannot encode {item.image} as {fmt}")
            dst = folder / "images" / f"{stem}{ext}"
            atomic_write(dst, lambda tmp, b=buf: Path(tmp).write_bytes(b.tobytes()))
        total += dst.stat().st_size
        ok, buf = cv2.imencode(".png", (read_mask(item.mask) > 127).astype("uint8") * 255,
                               [cv2.IMWRITE_PNG_BILEVEL, 1, cv2.IMWRITE_PNG_COMPRESSION, 9])
        mdst = folder / "masks" / f"{stem}.png"
        atomic_write(mdst, lambda tmp, b=buf: Path(tmp).write_bytes(b.tobytes()))
        total += mdst.stat().st_size
    return total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a training config; its data.train sources are packed")
    p.add_argument("--out", required=True, help="output folder (one subfolder per source)")
    p.add_argument("--only", nargs="+", default=None, help="pack only the sources with these folder names")
    p.add_argument("--format", choices=["webp", "jpg", "copy"], default="webp")
    p.add_argument("--quality", type=int, default=85)
    p.add_argument("--root-as", default=None, help="folder the packed sources will be read from (default: --out)")
    args = p.parse_args(argv)

    cfg = load_config(args.config)
    out = Path(args.out)
    specs, total = [], 0
    for spec in cfg["data"]["train"]:
        if spec.get("type", "pairs") != "pairs":
            raise SystemExit(f"pack_data: only 'pairs' sources can be packed, got {spec}")
        name = Path(spec["root"]).name
        if args.only and name not in args.only:
            continue
        items = build_items([spec], "train", cfg.get("_base_dir"), cfg["data"]["empty"])
        size = pack_source(items, out / name, args.format, args.quality)
        total += size
        print(f"{name}: {len(items)} training pairs, {size / 2**20:.1f} MiB", file=sys.stderr)
        packed = {"type": "pairs", "root": str(Path(args.root_as or args.out) / name)}
        if spec.get("label_offset") is not None:  # the masks travel as they are, so their offset travels too
            packed["label_offset"] = [float(v) for v in spec["label_offset"]]
        specs.append(packed)
    if not specs:
        raise SystemExit(f"pack_data: no source of {args.config} matches --only {args.only}")
    text = yaml.safe_dump(specs, default_flow_style=True, width=10**6).strip()
    atomic_write(out / "sources.yaml", lambda tmp: Path(tmp).write_text(text + "\n"))
    print(f"{out}: {total / 2**20:.1f} MiB; data.train={text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
