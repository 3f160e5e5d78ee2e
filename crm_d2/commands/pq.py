"""`crm-d2 pq`: COCO panoptic quality of a prediction folder against its GT, no refinement.

Same numbers as panopticapi's pq_compute (see crm_d2.panoptic.pq); `--json` prints only the three summary groups so
scripts can diff runs.
"""
import json
import sys

NAME = "pq"
HELP = "evaluate COCO panoptic predictions: PQ/SQ/RQ for all, things and stuff"


def add_arguments(parser):
    parser.add_argument("--gt-json", required=True, help="COCO panoptic GT JSON")
    parser.add_argument("--gt-dir", required=True, help="folder of GT panoptic PNGs")
    parser.add_argument("--pred-json", required=True, help="COCO panoptic predictions JSON")
    parser.add_argument("--pred-dir", required=True, help="folder of predicted panoptic PNGs")
    parser.add_argument("--json", action="store_true", help='print {"all", "things", "stuff"} as JSON')
    parser.add_argument("--workers", type=int, default=None, help="processes (default: min(cpu count, 8))")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave out images with bad input (listed on stderr) instead of stopping at the first")


def run(args):
    from crm_d2.panoptic.pq import format_pq_table, pq_compute

    results = pq_compute(args.gt_json, args.gt_dir, args.pred_json, args.pred_dir, workers=args.workers,
                         strict=not args.skip_bad, progress=not args.json)
    for s in results["skipped"]:
        print(f"skipped image_id {s['image_id']} ({s['file_name']}): {s['reason']}", file=sys.stderr)
    if args.json:
        print(json.dumps({k: results[k] for k in ("all", "things", "stuff")}))
    else:
        print(format_pq_table({"prediction": results}))
        print(f"{results['n_images']} images evaluated, {len(results['skipped'])} skipped")
    return 0
