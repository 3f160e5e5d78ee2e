#!/usr/bin/env python3
"""Write a tiny synthetic COCO val in the layout Detectron2 expects, to try the CRM Detectron2 run without COCO.

    python datasets/make_tiny_coco.py OUT_ROOT [--images 4]
    DETECTRON2_DATASETS=OUT_ROOT python tools/train_net.py --config-file configs/PanopticFPN-R50-CRM.yaml \
        --eval-only MODEL.DEVICE cpu MODEL.CRM.WEIGHTS demo

Writes OUT_ROOT/coco/val2017/*.jpg, panoptic_val2017/*.png, annotations/panoptic_val2017.json and
annotations/instances_val2017.json: shapes of COCO thing classes on two stuff regions, with real COCO category
ids and all 133 panoptic categories, so the real dataset names and metadata apply. Numbers on it mean nothing;
it checks that everything runs and that the files agree.
"""
import argparse
import os

import cv2
import numpy as np
from pycocotools import mask as mask_util

from crm_d2.io import write_image, write_json, write_png
from crm_d2.optional import require_detectron2
from crm_d2.panoptic.coco import id2rgb, mask_bbox

# COCO ids: things person, car, dog; stuff sky-other-merged, grass-merged.
THINGS = (1, 3, 18)
STUFF = (187, 193)


def coco_panoptic_categories():
    """The 133 COCO panoptic categories (id, name, isthing, color), as detectron2 lists them."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    return [{"id": c["id"], "name": c["name"], "isthing": c["isthing"], "color": c["color"],
             "supercategory": c.get("supercategory", "")} for c in COCO_CATEGORIES]


def _scene(rng, h, w):
    """Image, segment id map and segments_info of one synthetic scene."""
    yy, xx = np.mgrid[0:h, 0:w]
    horizon = int(h * rng.uniform(0.35, 0.6))
    ids = np.where(yy < horizon, 1, 2).astype(np.uint32)
    segments = [{"id": 1, "category_id": STUFF[0], "iscrowd": 0}, {"id": 2, "category_id": STUFF[1], "iscrowd": 0}]
    image = np.zeros((h, w, 3), np.float32)
    image[yy < horizon] = (110, 160, 230)
    image[yy >= horizon] = (70, 150, 60)
    for k in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0.3, 0.8) * h, rng.uniform(0.15, 0.85) * w
        ry, rx = rng.uniform(0.12, 0.25) * h, rng.uniform(0.08, 0.2) * w
        if k % 2 == 0:
            shape = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            shape = (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
        sid = 10 + k
        ids[shape] = sid
        segments.append({"id": sid, "category_id": THINGS[k % len(THINGS)], "iscrowd": 0})
        image[shape] = rng.uniform(20, 235, size=3)
    ids[:, :2] = 0  # a void border strip
    image += rng.normal(0, 6, size=image.shape)
    image = cv2.GaussianBlur(np.clip(image, 0, 255), (3, 3), 0).astype(np.uint8)
    present = set(np.unique(ids).tolist())
    segments = [s for s in segments if s["id"] in present]
    for s in segments:
        m = ids == s["id"]
        s["area"] = int(m.sum())
        s["bbox"] = mask_bbox(m)
    return image, ids, segments


def make_tiny_coco(root, num_images=4, seed=0, sizes=((96, 128), (120, 90), (80, 112), (100, 100))):
    """Write the synthetic split under `root`/coco; returns the paths written (dict)."""
    rng = np.random.default_rng(seed)
    coco = os.path.join(root, "coco")
    paths = {
        "image_root": os.path.join(coco, "val2017"),
        "panoptic_root": os.path.join(coco, "panoptic_val2017"),
        "panoptic_json": os.path.join(coco, "annotations", "panoptic_val2017.json"),
        "instances_json": os.path.join(coco, "annotations", "instances_val2017.json"),
    }
    categories = coco_panoptic_categories()
    images, annotations, instances = [], [], []
    for i in range(num_images):
        h, w = sizes[i % len(sizes)]
        image, ids, segments = _scene(rng, h, w)
        image_id = 1000 + i
        stem = f"{image_id:012d}"
        write_image(os.path.join(paths["image_root"], stem + ".jpg"), image)
        write_png(os.path.join(paths["panoptic_root"], stem + ".png"), id2rgb(ids))
        images.append({"id": image_id, "file_name": stem + ".jpg", "height": h, "width": w})
        annotations.append({"image_id": image_id, "file_name": stem + ".png", "segments_info": segments})
        for s in segments:
            if s["category_id"] in THINGS:
                rle = mask_util.encode(np.asfortranarray((ids == s["id"]).astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                instances.append({"id": len(instances) + 1, "image_id": image_id, "category_id": s["category_id"],
                                  "segmentation": rle, "area": s["area"], "bbox": s["bbox"], "iscrowd": 0})
    write_json(paths["panoptic_json"], {"images": images, "annotations": annotations, "categories": categories})
    write_json(paths["instances_json"], {
        "images": images, "annotations": instances,
        "categories": [{"id": c["id"], "name": c["name"], "supercategory": c["supercategory"]}
                       for c in categories if c["isthing"]],
    })
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="output root (use it as DETECTRON2_DATASETS)")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    require_detectron2("datasets/make_tiny_coco.py")  # for its COCO category table
    paths = make_tiny_coco(args.root, args.images, args.seed)
    print(f"wrote {args.images} synthetic images: {paths['panoptic_json']}, {paths['instances_json']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
