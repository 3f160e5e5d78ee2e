#!/usr/bin/env python3
"""Make the class-agnostic entity GT of COCO panoptic val for entity AP with stock pycocotools.

Every panoptic segment (thing or stuff) becomes one instance of the single category "entity"; crowd segments
stay iscrowd=1. The conversion is crm_d2.panoptic.instances_eval.entity_gt_from_panoptic; this script only
finds the files in Detectron2's dataset layout and writes the JSON that "coco_2017_val_entity_crm" reads.

    python datasets/prepare_entity_gt.py                      # $DETECTRON2_DATASETS (default ./datasets)
    python datasets/prepare_entity_gt.py --root /data --split val2017
"""
import argparse
import os

from crm_d2.io import write_json
from crm_d2.panoptic.coco import load_panoptic
from crm_d2.panoptic.instances_eval import entity_gt_from_panoptic


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")),
                        help="folder holding coco/ (default: $DETECTRON2_DATASETS or ./datasets)")
    parser.add_argument("--split", default="val2017")
    parser.add_argument("--panoptic-json", help="default: ROOT/coco/annotations/panoptic_SPLIT.json")
    parser.add_argument("--panoptic-dir", help="default: ROOT/coco/panoptic_SPLIT")
    parser.add_argument("--output", help="default: ROOT/coco/annotations/entity_crm_SPLIT.json")
    parser.add_argument("--things-only", action="store_true", help="keep thing segments only")
    args = parser.parse_args(argv)

    coco = os.path.join(args.root, "coco")
    pan_json = args.panoptic_json or os.path.join(coco, "annotations", f"panoptic_{args.split}.json")
    pan_dir = args.panoptic_dir or os.path.join(coco, f"panoptic_{args.split}")
    output = args.output or os.path.join(coco, "annotations", f"entity_crm_{args.split}.json")
    gt = entity_gt_from_panoptic(load_panoptic(pan_json, pan_dir), things_only=args.things_only)
    write_json(output, gt)
    crowd = sum(a["iscrowd"] for a in gt["annotations"])
    print(f"{output}: {len(gt['images'])} images, {len(gt['annotations'])} entities ({crowd} crowd)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
