"""`crm-d2 demo`: the whole panoptic job on the sample shipped in crm_d2/assets/sample, on CPU, no download.

Five Clothing Co-Parsing photos with their label maps (see the sample's PROVENANCE.md) become a COCO panoptic
ground truth (one segment per label region; background, hair and skin are stuff, garments things). Coarse
"predictions" are made as a low-resolution segmenter would: every segment's mask is averaged down by `--factor`,
disturbed a little (seeded noise, a small shift) and upsampled bilinearly; the arg-max gives the coarse id map.
The demo model refines them; the PQ table (without / with CRM) and the categories that gained and lost most are
printed, and the refined COCO panoptic JSON/PNGs, side-by-side PNG pictures (coarse | CRM | ground truth) and a
report to look at (OUT/report/index.html, crm_d2.report) are written to the output folder.
"""
import json
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np

from crm_d2.io import read_image, read_mask, write_image, write_png
from crm_d2.panoptic.coco import PanopticSet, write_panoptic_image, write_panoptic_json
from crm_d2.pictures import side_by_side
from crm_d2.report import check_report_dir, report_source

from .common import add_report_arguments, build_refiner, check_run_settings, model_settings
from .panoptic import add_refine_arguments, evaluate, options_from_args, refine_panoptic_set, report, write_report

NAME = "demo"
HELP = "run panoptic refinement + PQ on the shipped sample (CPU, no download)"

SAMPLE = Path(__file__).resolve().parent.parent / "assets" / "sample"


def add_arguments(parser):
    parser.add_argument("-o", "--output", default="crm_demo_output", help="output folder (default ./crm_demo_output)")
    parser.add_argument("--sample", default=str(SAMPLE), help="sample folder (images/, labels/, categories.json)")
    parser.add_argument("--long-side", type=int, default=None,
                        help="resize the sample to this long side first (default: as shipped, 640)")
    parser.add_argument("--factor", type=int, default=12, help="down-sampling factor of the simulated segmenter")
    parser.add_argument("--regions", choices=("parts", "person"), default="parts",
                        help="segments: every CCP region (hair, skin, each garment; default), or the person "
                             "silhouette + background (what a refiner trained on whole objects knows best)")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    parser.add_argument("--no-overlays", action="store_true",
                        help="skip the side-by-side pictures (OUT/overlays/*.png: coarse | CRM | ground truth)")
    add_report_arguments(parser, default_help="default: OUT/report")
    add_refine_arguments(parser, weights_default="demo")


# ----------------------------------------------------------------------------------------- sample -> COCO panoptic
def load_sample(sample_dir, long_side=None, limit=None):
    """[(name, image RGB, label map)] of the sample, optionally resized; plus its categories {id: cat}."""
    sample_dir = Path(sample_dir)
    cat_path = sample_dir / "categories.json"
    if not cat_path.is_file():
        raise FileNotFoundError(f"demo sample is incomplete: {cat_path} is missing")
    with open(cat_path) as f:
        categories = {c["id"]: c for c in json.load(f)["categories"]}
    images = sorted((sample_dir / "images").glob("*.jpg"))
    if not images:
        raise FileNotFoundError(f"no sample images in {sample_dir / 'images'}")
    items = []
    for path in images[: limit if limit else None]:
        image = read_image(path)
        labels = read_mask(sample_dir / "labels" / (path.stem + ".png"))
        if labels.shape != image.shape[:2]:
            raise ValueError(f"sample label map {path.stem}.png does not match its image size")
        if long_side:
            h, w = labels.shape
            s = long_side / max(h, w)
            size = (max(1, round(w * s)), max(1, round(h * s)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            labels = cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST)
        items.append((path.stem, image, labels))
    return items, categories


PERSON = {"id": 100, "name": "person", "isthing": 1, "supercategory": "person", "ccp_label": -1}


def labels_to_panoptic(labels, categories, regions="parts"):
    """CCP label map -> (id map, segments_info): one segment per label value, id = category id = label + 1.

    regions="person" makes every non-background label one `person` thing (the whole silhouette, which is what a
    mask refiner trained on whole objects is for); "parts" keeps hair, skin, each garment as its own segment."""
    if regions == "person":
        labels = np.where(labels > 0, PERSON["ccp_label"], 0)
    by_label = {c["ccp_label"]: c for c in categories.values()}
    ids = np.zeros(labels.shape, np.uint32)
    segs = []
    for v in np.unique(labels):
        cat = by_label.get(int(v))
        if cat is None:
            raise ValueError(f"sample label {v} has no category in categories.json")
        m = labels == v
        ids[m] = cat["id"]
        segs.append({"id": cat["id"], "category_id": cat["id"], "iscrowd": 0})
    return ids, segs


def simulate_coarse(gt_ids, gt_segments, categories, factor=12, seed=0, noise=0.06):
    """What a segmenter working at 1/factor resolution returns: blurry, blocky boundaries, thin parts lost.

    Deterministic for a given seed. Things get a score (their mean coarse probability); segments that lose
    all pixels in the arg-max are simply absent, as they would be from a real model.
    """
    rng = np.random.default_rng(seed)
    h, w = gt_ids.shape
    lh, lw = max(2, round(h / factor)), max(2, round(w / factor))
    shift = np.float32([[1, 0, rng.uniform(-factor / 4, factor / 4)], [0, 1, rng.uniform(-factor / 4, factor / 4)]])
    probs = []
    for s in gt_segments:
        low = cv2.resize((gt_ids == s["id"]).astype(np.float32), (lw, lh), interpolation=cv2.INTER_AREA)
        low += rng.normal(0, noise, low.shape).astype(np.float32)
        up = cv2.resize(low, (w, h), interpolation=cv2.INTER_LINEAR)
        probs.append(cv2.warpAffine(up, shift, (w, h), borderMode=cv2.BORDER_REPLICATE))
    probs = np.stack(probs)
    winner = probs.argmax(0)
    ids = np.zeros((h, w), np.uint32)
    segs = []
    for k, s in enumerate(gt_segments):
        m = winner == k
        if not m.any():
            continue
        sid = len(segs) + 1
        ids[m] = sid
        seg = {"id": sid, "category_id": s["category_id"], "iscrowd": 0}
        if categories[s["category_id"]]["isthing"]:
            seg["score"] = round(float(np.clip(probs[k][m].mean(), 0, 1)), 4)
        segs.append(seg)
    return ids, segs


def build_dataset(items, categories, out_dir, factor, regions="parts"):
    """Write images/, gt/ + gt.json and coarse/ + coarse.json under out_dir (deterministic; cheap to redo)."""
    out_dir = Path(out_dir)
    gt_anns, coarse_anns, images = [], [], []
    for image_id, (name, image, labels) in enumerate(items, start=1):
        write_png(out_dir / "images" / f"{name}.png", image)
        images.append({"id": image_id, "file_name": f"{name}.png", "height": image.shape[0],
                       "width": image.shape[1]})
        gt_ids, gt_segs = labels_to_panoptic(labels, categories, regions)
        gt_anns.append(write_panoptic_image(out_dir / "gt", f"{name}.png", image_id, gt_ids, gt_segs, sidecar=False))
        seed = zlib.crc32(name.encode())
        c_ids, c_segs = simulate_coarse(gt_ids, gt_segs, categories, factor=factor, seed=seed)
        coarse_anns.append(write_panoptic_image(out_dir / "coarse", f"{name}.png", image_id, c_ids, c_segs,
                                                sidecar=False))
    cats = [{k: v for k, v in c.items() if k != "ccp_label"} for c in categories.values()]
    write_panoptic_json(out_dir / "gt.json", gt_anns, cats, images=images)
    write_panoptic_json(out_dir / "coarse.json", coarse_anns, cats, images=images)
    return PanopticSet(out_dir / "gt.json", out_dir / "gt"), PanopticSet(out_dir / "coarse.json", out_dir / "coarse")


# ----------------------------------------------------------------------------------------- pictures
def write_overlays(out_dir, images_dir, gt, coarse, refined):
    out_dir = Path(out_dir)
    paths = []
    for image_id, ann in refined.annotations.items():
        name = Path(ann["file_name"]).stem
        image = read_image(Path(images_dir) / f"{name}.png")
        c_ann, g_ann = coarse.annotations[image_id], gt.annotations[image_id]
        panels = [("coarse", coarse.read_ids(c_ann), c_ann["segments_info"]),
                  ("CRM", refined.read_ids(ann), ann["segments_info"]),
                  ("ground truth", gt.read_ids(g_ann), g_ann["segments_info"])]
        path = out_dir / "overlays" / f"{name}.png"
        write_image(path, side_by_side(image, panels))
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------- command
def run(args):
    out = Path(args.output)
    try:
        refiner = build_refiner(args)
    except FileNotFoundError as exc:
        if args.weights != "demo":
            raise
        raise RuntimeError(f"the demo model is missing, so the demo cannot run: {exc}") from None
    options = options_from_args(args)
    items, categories = load_sample(args.sample, args.long_side, args.limit)
    if args.regions == "person":
        categories = {**categories, PERSON["id"]: PERSON}
    settings = {"demo": True, "sample": str(Path(args.sample).resolve()), "long_side": args.long_side,
                "factor": args.factor, "regions": args.regions, **model_settings(args), "options": vars(options)}
    check_run_settings(out, settings)
    report_dir = Path(args.report) if args.report else out / "report"
    source = report_source(NAME, out)
    check_report_dir(report_dir, source, args.overwrite)
    print(f"demo: {len(items)} sample images, coarse masks from a simulated 1/{args.factor} segmenter, "
          f"refining with weights {args.weights!r} -> {out}", file=sys.stderr)
    gt, coarse = build_dataset(items, categories, out, args.factor, args.regions)
    refined = refine_panoptic_set(refiner, out / "images", coarse, out, options, gt=gt)
    base, crm = evaluate(gt, coarse, refined)
    per_category = report(base, crm, as_json=args.json, out_dir=out, extra={"weights": str(args.weights)})
    page = write_report(report_dir, gt, coarse, refined, out / "images", base, crm, per_category, source,
                        args.overwrite, title="crm-d2 demo: CRM on the shipped sample")
    print(f"report: {page}", file=sys.stderr)
    if not args.no_overlays:
        paths = write_overlays(out, out / "images", gt, coarse, refined)
        print(f"side-by-side pictures: {paths[0].parent}/ ({len(paths)} files)", file=sys.stderr)
    print(f"refined COCO panoptic: {out / 'panoptic.json'} + {out / 'panoptic'}/", file=sys.stderr)
    return 0
