"""`crm-d2 panoptic`: refine every segment of a COCO panoptic prediction with CRM and report PQ with and without.

Outputs in OUT: `panoptic/` (refined PNGs, each with a `.segments.json` sidecar written after it: an image whose
sidecar exists is done and skipped on rerun), `panoptic.json` (the refined predictions, COCO panoptic format),
`pq.json` (numbers, per category too) and `run.json` (the settings; rerunning into OUT with other settings is
refused, so that a resumed run never mixes two configurations). `--report DIR` adds a page to look at
(crm_d2.report).
"""
import copy
import json
import sys
from pathlib import Path

from crm_d2.distributed import DistEnv, session
from crm_d2.io import IMAGE_EXTS, read_image, write_json
from crm_d2.panoptic.coco import PanopticSet, read_panoptic_sidecar, write_panoptic_image, write_panoptic_json
from crm_d2.panoptic.merge import MERGE_RULES
from crm_d2.panoptic.refine import TARGETS, SegmentRefineOptions, refine_panoptic
from crm_d2.report import check_report_dir, report_source

from .common import (add_model_arguments, add_report_arguments, add_scales_argument, build_refiner,
                     check_run_settings, model_settings)

NAME = "panoptic"
HELP = "refine a COCO panoptic prediction with CRM; PQ/SQ/RQ with and without CRM"


# ----------------------------------------------------------------------------------------- shared with instances/demo
MERGE_HELP = ("how overlaps and gaps between refined segments are settled: hybrid: things over stuff, then the "
              "higher refined probability; paste: the base model's order (things by score, then stuff); prob: the "
              "higher probability, things and stuff alike; -void / -nearest: pixels no refined segment claims become "
              "void / go to the nearest segment instead of keeping their original one (docs/panoptic.md)")
# Instances are all things, so "prob" is "hybrid" there and --targets does not apply.
INSTANCE_MERGE_RULES = tuple(r for r in MERGE_RULES if not r.startswith("prob"))
INSTANCE_MERGE_HELP = ("with --non-overlapping only (otherwise every mask is refined on its own and may overlap "
                       "the others): where refined masks overlap, hybrid: the higher refined probability wins; "
                       "paste: the higher score wins; -void / -nearest: pixels no refined mask claims become "
                       "background / go to the nearest mask instead of staying with their original mask")


def add_refine_arguments(parser, weights_default=None, instances=False):
    """Options shared by the panoptic, instances and demo commands (`instances`: only those that apply there)."""
    d = SegmentRefineOptions()
    g = parser.add_argument_group("refinement")
    add_model_arguments(g, weights_default)
    if not instances:
        g.add_argument("--targets", choices=TARGETS, default=d.targets,
                       help="which segments to refine: things, stuff or both")
    g.add_argument("--min-area", type=int, default=d.min_area, help="segments smaller than this keep their mask")
    g.add_argument("--margin", type=float, default=d.margin, help="ROI context, fraction of the segment box")
    g.add_argument("--max-side", type=int, default=d.max_side,
                   help="cap on the encoder input long side per ROI (0 = no cap)")
    add_scales_argument(g)
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="segments refined per call")
    g.add_argument("--band", type=float, default=d.band,
                   help="changes allowed only this close to a segment's coarse boundary, fraction of the long "
                        "side (0 = no limit)")
    g.add_argument("--merge", choices=INSTANCE_MERGE_RULES if instances else MERGE_RULES, default=d.merge,
                   help=INSTANCE_MERGE_HELP if instances else MERGE_HELP)
    g.add_argument("--drop-empty", action="store_true", default=d.drop_empty,
                   help="drop a segment that refinement leaves without a pixel (default: it keeps its base mask)")
    g.add_argument("--limit", type=int, default=None, help="only the first N images (quick looks)")


def options_from_args(args):
    return SegmentRefineOptions(targets=getattr(args, "targets", SegmentRefineOptions.targets),
                                min_area=args.min_area, margin=args.margin, max_side=args.max_side,
                                scales=args.scales, batch_size=args.batch_size, merge=args.merge,
                                band=args.band or None, drop_empty=args.drop_empty)


def find_image(images_dir, image_id, file_names):
    """Path of an image in `images_dir` from its COCO `images` file name, else the PNG's stem with any image
    extension; FileNotFoundError names the image id and folder."""
    images_dir = Path(images_dir)
    for name in file_names:
        if name and (images_dir / name).is_file():
            return images_dir / name
    for name in file_names:
        if not name:
            continue
        stem = Path(name).stem
        for ext in IMAGE_EXTS:
            cand = images_dir / (stem + ext)
            if cand.is_file():
                return cand
    raise FileNotFoundError(f"no image for image_id {image_id} ({', '.join(n for n in file_names if n)}) "
                            f"in {images_dir}")


def subset(pset, image_ids):
    """A PanopticSet view restricted to `image_ids` (to evaluate base and refined on the same images)."""
    view = copy.copy(pset)
    keep = set(image_ids)
    view.annotations = {i: a for i, a in pset.annotations.items() if i in keep}
    view.by_file = {a["file_name"]: a for a in view.annotations.values()}
    return view


# ----------------------------------------------------------------------------------------- the job
def refine_panoptic_set(refiner, images_dir, pred, out_dir, options, gt=None, limit=None, progress=True, env=None):
    """Refine every annotation of `pred` (a PanopticSet) into out_dir/panoptic/ and write out_dir/panoptic.json.

    Images with a finished output are skipped (resume). Under torchrun (`env`, crm_d2.distributed.session) each
    rank refines its share of the unfinished images, and rank 0, once all are done, writes panoptic.json from the
    outputs on disk, so that the result is the one-process result. Returns the refined PanopticSet (None on the
    other ranks).
    """
    env = env or DistEnv()
    out_dir = Path(out_dir)
    png_dir = out_dir / "panoptic"
    if not pred.annotations:
        raise ValueError(f"{pred.json_path} has no annotations: nothing to refine")
    categories = pred.categories or (gt.categories if gt is not None else {})
    if not categories:
        raise ValueError(f"{pred.json_path} has no 'categories' (and no GT given): 'isthing' is needed to refine")
    anns = list(pred.annotations.values())[: limit if limit else None]
    if gt is not None:
        for ann in anns:
            if ann["image_id"] not in gt.annotations:
                raise ValueError(f"{pred.json_path}: prediction {ann['file_name']} has image_id {ann['image_id']}, "
                                 f"which is not in the ground truth {gt.json_path}")
    images = dict(gt.images) if gt is not None else {}
    images.update(pred.images)

    from tqdm import tqdm

    # Rank 0 says what is left (the others may already be writing), and the ranks share that, not the whole list:
    # a run resumed with another number of processes stays balanced.
    pending = env.decide(lambda: [k for k, ann in enumerate(anns)
                                  if read_panoptic_sidecar(png_dir, ann["file_name"]) is None])
    for k in tqdm(env.shard(pending), desc="CRM panoptic", unit="img", disable=not (progress and env.main)):
        ann = anns[k]
        image_id = ann["image_id"]
        image_path = find_image(images_dir, image_id, [images.get(image_id, {}).get("file_name"), ann["file_name"]])
        where = f"{pred.png_path(ann)} (image_id {image_id})"
        ids = pred.read_ids(ann, check=False)
        image = read_image(image_path)
        if image.shape[:2] != ids.shape:
            raise ValueError(f"image {image_path} is {image.shape[1]}x{image.shape[0]} but its panoptic PNG {where} "
                             f"is {ids.shape[1]}x{ids.shape[0]}")
        new_ids, segs = refine_panoptic(refiner, image, ids, ann["segments_info"], options, categories=categories,
                                        where=where)
        write_panoptic_image(png_dir, ann["file_name"], image_id, new_ids, segs)
    env.barrier()
    if not env.main:
        return None
    done = [read_panoptic_sidecar(png_dir, ann["file_name"]) for ann in anns]
    lost = [ann["file_name"] for ann, a in zip(anns, done) if a is None]
    if lost:
        raise RuntimeError(f"{png_dir}: no finished output for {', '.join(lost[:3])} after the run (removed "
                           f"meanwhile?); rerun to redo them")
    images_out = [images[a["image_id"]] for a in done if a["image_id"] in images] or None
    write_panoptic_json(out_dir / "panoptic.json", done, categories, images=images_out)
    return PanopticSet(out_dir / "panoptic.json", png_dir)


def evaluate(gt, pred, refined, workers=None):
    """PQ of the original and the refined predictions on the refined images; returns (base, crm)."""
    from crm_d2.panoptic.pq import pq_compute

    ids = list(refined.annotations)
    g, p = subset(gt, ids), subset(pred, ids)
    base = pq_compute(g, None, p, None, workers=workers)
    crm = pq_compute(g, None, refined, None, workers=workers)
    return base, crm


def report(base, crm, as_json=False, out_dir=None, extra=None, stream=None):
    """Print the with/without table and the categories that gained and lost most (or JSON), and save the numbers
    to out_dir/pq.json. Returns the per-category table (crm_d2.panoptic.per_category)."""
    from crm_d2.panoptic.per_category import format_changes, panoptic_per_category
    from crm_d2.panoptic.pq import format_pq_table

    stream = stream or sys.stdout
    groups = ("all", "things", "stuff")
    per_category = panoptic_per_category(base, crm)
    payload = {
        "without_crm": {g: base[g] for g in groups},
        "with_crm": {g: crm[g] for g in groups},
        "difference": {g: {k: crm[g][k] - base[g][k] for k in ("pq", "sq", "rq")} for g in groups},
        "n_images": crm["n_images"],
        **(extra or {}),
        "per_category": per_category,
    }
    if out_dir is not None:
        write_json(Path(out_dir) / "pq.json", payload)
    if as_json:
        print(json.dumps(payload, indent=1), file=stream)
    else:
        print(format_pq_table({"without CRM": base, "with CRM": crm}), file=stream)
        print(f"({crm['n_images']} images)", file=stream)
        print(format_changes(per_category), file=stream)
    return per_category


def write_report(report_dir, gt, pred, refined, images_dir, base, crm, per_category, source, overwrite=False,
                 title="CRM panoptic refinement"):
    """The report of a panoptic run (crm_d2.report) from its files; the photos are looked up in images_dir as
    refinement looked them up. Returns the page's path."""
    from crm_d2.report import panoptic_report, pq_comparison

    images = {**gt.images, **pred.images}

    def image_path(image_id, ann):
        return find_image(images_dir, image_id, [images.get(image_id, {}).get("file_name"), ann["file_name"]])

    # the gallery walks the refined annotations and looks the base and GT ones up by image id
    return panoptic_report(report_dir, gt, pred, refined, image_path,
                           pq_comparison(base, crm), per_category, source, overwrite, title=title)


# ----------------------------------------------------------------------------------------- CLI
def add_arguments(parser):
    parser.add_argument("--images", required=True, help="folder of the original images")
    parser.add_argument("--pred-json", required=True, help="COCO panoptic predictions JSON")
    parser.add_argument("--pred-dir", required=True, help="folder of the prediction PNGs")
    parser.add_argument("--gt-json", default=None, help="COCO panoptic ground truth JSON (for the PQ table)")
    parser.add_argument("--gt-dir", default=None, help="folder of the ground-truth PNGs")
    parser.add_argument("-o", "--output", required=True, help="output folder (resumable)")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    parser.add_argument("--workers", type=int, default=None, help="processes for PQ")
    add_report_arguments(parser)
    add_refine_arguments(parser)


def run(args):
    with session(args.device) as env:
        return _run(args, env)


def _run(args, env):
    """The command on one process; under torchrun every rank runs it (docs/panoptic.md, 'Many GPUs')."""
    if (args.gt_json is None) != (args.gt_dir is None):
        raise ValueError("--gt-json and --gt-dir go together")
    if not Path(args.images).is_dir():
        raise FileNotFoundError(f"image folder not found: {args.images}")
    if args.report and args.gt_json is None:
        raise ValueError("--report needs --gt-json and --gt-dir (its tables and outlines compare with the GT)")
    options = options_from_args(args)
    pred = PanopticSet(args.pred_json, args.pred_dir)
    gt = PanopticSet(args.gt_json, args.gt_dir) if args.gt_json else None
    source = report_source(NAME, args.output)
    if args.report:  # before the long part: a refused folder must not wait for the end of the run
        env.decide(check_report_dir, args.report, source, args.overwrite)
    settings = {"pred_json": str(Path(args.pred_json).resolve()), **model_settings(args), "options": vars(options)}
    refiner = build_refiner(args, env.device)  # first: a mistyped --weights must not be recorded as the settings
    env.decide(check_run_settings, args.output, settings)
    refined = refine_panoptic_set(refiner, args.images, pred, args.output, options, gt=gt, limit=args.limit, env=env)
    if not env.main:
        return 0
    print(f"refined panoptic predictions: {Path(args.output) / 'panoptic.json'}", file=sys.stderr)
    if gt is None:
        print("no --gt-json given: PQ not computed", file=sys.stderr)
        return 0
    base, crm = evaluate(gt, pred, refined, workers=args.workers)
    per_category = report(base, crm, as_json=args.json, out_dir=args.output)
    if args.report:
        page = write_report(args.report, gt, pred, refined, args.images, base, crm, per_category, source,
                            args.overwrite)
        print(f"report: {page}", file=sys.stderr)
    return 0
