"""`crm-d2 eval`: IoU and mBA of coarse and refined masks on a BIG-layout folder."""
import json
import math
import sys
from pathlib import Path

from tqdm import tqdm

from ..io import list_big, read_mask
from ..metrics import RefinementMetrics

NAME = "eval"
HELP = "IoU/mBA of the coarse and the refined masks of a BIG-layout folder"


def add_arguments(parser):
    parser.add_argument("--big-dir", required=True, help="folder with NAME_gt.png and NAME_seg.png")
    parser.add_argument("--pred-dir", required=True, help="refined masks NAME.png (from crm-d2 refine --big-dir)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args):
    skipped = []
    items = [it for it in list_big(args.big_dir, skipped=skipped) if it["gt"] is not None]
    for name, why in skipped:
        print(f"skipped {name}: {why}", file=sys.stderr)
    if not items:
        raise FileNotFoundError(f"no NAME_gt.png ground truth in {args.big_dir}")
    missing = [it["name"] for it in items if not (Path(args.pred_dir) / f"{it['name']}.png").exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} prediction(s) missing in {args.pred_dir}, e.g. {missing[0]}.png")
    meter = RefinementMetrics()
    for it in tqdm(items, desc="eval", unit="img"):
        meter.update(read_mask(Path(args.pred_dir) / f"{it['name']}.png"), read_mask(it["gt"]),
                     coarse=read_mask(it["seg"]), name=it["name"])
    s = meter.summary()
    if args.json:
        print(json.dumps({k: s[k] for k in ("iou", "mba", "coarse_iou", "coarse_mba", "n")}))
        return 0
    fmt = lambda v: "  n/a" if v is None or math.isnan(v) else f"{v:6.2f}"
    print(f"{'':10s}{'IoU':>8s}{'mBA':>8s}   (n={s['n']}, BIG protocol, percent)")
    print(f"{'coarse':10s}{fmt(s['coarse_iou']):>8s}{fmt(s['coarse_mba']):>8s}")
    print(f"{'refined':10s}{fmt(s['iou']):>8s}{fmt(s['mba']):>8s}")
    print(f"{'delta':10s}{fmt(s['iou'] - s['coarse_iou']):>8s}{fmt(s['mba'] - s['coarse_mba']):>8s}")
    if s["mba_skipped"]:
        print(f"mBA skipped for {s['mba_skipped']} image(s) whose ground truth has no boundary")
    return 0
