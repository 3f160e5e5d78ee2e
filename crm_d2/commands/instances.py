"""`crm-d2 instances`: refine instance / entity masks of a COCO results JSON with CRM; mask AP with and without.

The ground truth is a COCO instances JSON, or a COCO panoptic GT (JSON + `--gt-dir`) from which the
class-agnostic entity GT is built (every segment one entity). Outputs in OUT: `parts/<image_id>.json` (refined
results of one image, written atomically: present = done, skipped on rerun), `results.json` (all refined
results, COCO results format), `ap.json` (numbers, per category too: per object size for entity AP) and
`run.json` (settings; resuming under other settings is refused). `--report DIR` adds a page to look at
(crm_d2.report).
"""
import json
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from crm_d2.distributed import session
from crm_d2.io import read_image, write_json
from crm_d2.panoptic.instances_eval import (compressed_rle, encode_mask, entity_gt_from_panoptic, evaluate_masks,
                                            format_ap_table, rle_bytes)
from crm_d2.panoptic.per_category import combine, format_changes
from crm_d2.panoptic.refine import refine_instances
from crm_d2.report import ap_comparison, check_report_dir, instances_report, report_source

from .common import add_report_arguments, build_refiner, check_run_settings, model_settings
from .panoptic import add_refine_arguments, find_image, options_from_args

NAME = "instances"
HELP = "refine instance/entity masks (COCO results JSON) with CRM; mask AP with and without CRM"


def add_arguments(parser):
    parser.add_argument("--images", required=True, help="folder of the original images")
    parser.add_argument("--pred-json", required=True, help="COCO results JSON (segmentation as RLE), e.g. "
                        "Detectron2's coco_instances_results.json")
    parser.add_argument("--gt-json", required=True,
                        help="COCO instances GT JSON, or a COCO panoptic GT JSON together with --gt-dir")
    parser.add_argument("--gt-dir", default=None, help="panoptic GT PNG folder: evaluate class-agnostic entity AP")
    parser.add_argument("--entity", action="store_true",
                        help="class-agnostic AP (implied by --gt-dir); masks of one image are refined as entities")
    parser.add_argument("--non-overlapping", action="store_true",
                        help="the masks of an image do not overlap (entity outputs) and must not after refinement")
    parser.add_argument("--score-thresh", type=float, default=0.0,
                        help="refine only results scoring at least this (the rest are kept as they are)")
    parser.add_argument("-o", "--output", required=True, help="output folder (resumable)")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    add_report_arguments(parser)
    add_refine_arguments(parser, instances=True)


def load_results(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results JSON not found: {path}")
    try:
        with open(path) as f:
            results = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if isinstance(results, dict) and "annotations" in results:
        results = results["annotations"]
    if not isinstance(results, list):
        raise ValueError(f"{path} must hold a list of COCO results")
    if not results:
        raise ValueError(f"{path} is an empty prediction list: nothing to refine or evaluate")
    return results


def load_gt(gt_json, gt_dir=None):
    """COCO instances GT dict; from a panoptic GT (with gt_dir) the class-agnostic entity GT."""
    if gt_dir is not None:
        from crm_d2.panoptic.coco import PanopticSet

        return entity_gt_from_panoptic(PanopticSet(gt_json, gt_dir))
    path = Path(gt_json)
    if not path.is_file():
        raise FileNotFoundError(f"GT JSON not found: {path}")
    with open(path) as f:
        gt = json.load(f)
    if not isinstance(gt, dict) or "images" not in gt or "annotations" not in gt:
        raise ValueError(f"{path} is not a COCO instances GT (needs 'images' and 'annotations'); for a panoptic "
                         f"GT pass its PNG folder with --gt-dir")
    return gt


def group_results(results, gt, pred_path):
    """Results by image_id, in file order, each checked against the GT images (id known, mask size). Polygons and
    uncompressed RLE are made compressed RLE here, once, so that the AP without CRM reads what refinement reads."""
    images = {im["id"]: im for im in gt["images"]}
    by_image = OrderedDict()
    for k, r in enumerate(results):
        missing = [key for key in ("image_id", "segmentation", "score") if key not in r]
        if missing:
            raise ValueError(f"{pred_path}: result {k} (image_id {r.get('image_id')}) lacks {missing}")
        im = images.get(r["image_id"])
        if im is None:
            raise ValueError(f"{pred_path}: result {k} is for image_id {r['image_id']}, which is not in the GT")
        results[k] = dict(r, segmentation=compressed_rle(r["segmentation"], im["height"], im["width"],
                                                         f"{pred_path}: result {k} (image_id {r['image_id']})"))
        by_image.setdefault(r["image_id"], []).append(k)
    return by_image, images


def refine_image(refiner, image, results, idx, options, non_overlapping, score_thresh, where):
    """Refined copies of one image's results (those refined to nothing are left out only with drop_empty)."""
    h, w = image.shape[:2]
    masks = np.stack([mask_utils.decode(rle_bytes(results[k]["segmentation"])).astype(bool) for k in idx])
    scores = np.array([float(results[k]["score"]) for k in idx])
    out = refine_instances(refiner, image, masks, scores, options, non_overlapping=non_overlapping,
                           select=scores >= score_thresh, where=where)
    kept = []
    for k, m in zip(idx, out):
        if m.any() or not options.drop_empty:
            kept.append(dict(results[k], segmentation=encode_mask(m)))
    return kept


def run(args):
    with session(args.device) as env:
        return _run(args, env)


def _run(args, env):
    """The command on one process. Under torchrun every rank runs it: each refines its share of the unfinished
    images into parts/, and rank 0 alone, once all are done, writes results.json and computes AP."""
    if not Path(args.images).is_dir():
        raise FileNotFoundError(f"image folder not found: {args.images}")
    options = options_from_args(args)
    results = load_results(args.pred_json)
    gt = load_gt(args.gt_json, args.gt_dir)
    class_agnostic = args.entity or args.gt_dir is not None
    by_image, images = group_results(results, gt, args.pred_json)
    out = Path(args.output)
    settings = {"pred_json": str(Path(args.pred_json).resolve()), **model_settings(args),
                "non_overlapping": args.non_overlapping,
                "score_thresh": args.score_thresh, "options": vars(options)}
    refiner = build_refiner(args, env.device)  # first: a mistyped --weights must not be recorded as the settings

    from tqdm import tqdm

    image_ids = list(by_image)[: args.limit if args.limit else None]

    def part(image_id):
        return out / "parts" / f"{image_id}.json"

    source = report_source(NAME, out)

    def pending():  # rank 0 alone: the settings record, then what is left (shared out, so resumes stay balanced)
        check_run_settings(out, settings)
        if args.report:  # before the long part: a refused folder must not wait for the end of the run
            check_report_dir(args.report, source, args.overwrite)
        return [i for i in image_ids if not part(i).is_file()]

    for image_id in tqdm(env.shard(env.decide(pending)), desc="CRM instances", unit="img", disable=not env.main):
        im = images[image_id]
        path = find_image(args.images, image_id, [im.get("file_name")])
        image = read_image(path)
        if (image.shape[0], image.shape[1]) != (im["height"], im["width"]):
            raise ValueError(f"image {path} is {image.shape[1]}x{image.shape[0]} but the GT says "
                             f"{im['width']}x{im['height']} (image_id {image_id})")
        where = f"{args.pred_json} (image_id {image_id})"
        kept = refine_image(refiner, image, results, by_image[image_id], options, args.non_overlapping,
                            args.score_thresh, where)
        write_json(part(image_id), kept)
    env.barrier()
    if not env.main:
        return 0
    refined = []
    for image_id in image_ids:  # every rank's parts, in the one-process order
        if not part(image_id).is_file():
            raise RuntimeError(f"{part(image_id)} is missing after the run (removed meanwhile?); rerun to redo it")
        with open(part(image_id)) as f:
            refined.extend(json.load(f))
    write_json(out / "results.json", refined)
    print(f"refined results: {out / 'results.json'}", file=sys.stderr)

    keep = set(image_ids)
    gt_sub = dict(gt, images=[im for im in gt["images"] if im["id"] in keep],
                  annotations=[a for a in gt["annotations"] if a["image_id"] in keep])
    base_results = [results[k] for i in image_ids for k in by_image[i]]
    base, base_rows, names = evaluate_masks(gt_sub, base_results, class_agnostic=class_agnostic, per_category=True)
    if not refined:
        raise ValueError("every mask was refined to nothing: no refined results to evaluate")
    crm, crm_rows, _ = evaluate_masks(gt_sub, refined, class_agnostic=class_agnostic, per_category=True)
    per_category = combine(base_rows, crm_rows, names)
    kind = "entity (class-agnostic) mask AP" if class_agnostic else "mask AP"
    payload = {"metric": kind, "without_crm": base, "with_crm": crm,
               "difference": {k: crm[k] - base[k] for k in base}, "n_images": len(image_ids),
               "per_category": per_category}
    write_json(out / "ap.json", payload)
    if args.json:
        print(json.dumps(payload, indent=1))
    else:
        print(f"{kind}, {len(image_ids)} images")
        print(format_ap_table({"without CRM": base, "with CRM": crm}))
        print(format_changes(per_category))
    if args.report:
        def image_path(image_id, im):
            return find_image(args.images, image_id, [im.get("file_name")])

        page = instances_report(args.report, gt_sub, base_results, refined, image_path,
                                ap_comparison(base, crm, kind), per_category, source, args.overwrite,
                                class_agnostic=class_agnostic)
        print(f"report: {page}", file=sys.stderr)
    return 0
