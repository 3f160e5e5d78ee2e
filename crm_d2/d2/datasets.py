"""Evaluation splits that need only COCO's panoptic annotations (registered under $DETECTRON2_DATASETS).

- "coco_2017_val_panoptic_crm": PQ of PanopticFPN / PanopticFCN. Detectron2's "coco_2017_val_panoptic_separated"
  (the category numbering these models predict in) lists its images through the semantic PNGs that
  datasets/prepare_panoptic_fpn.py makes with panopticapi; evaluation does not need them. Same images and
  metadata, listed from the panoptic JSON.
- "coco_2017_val_entity_crm": class-agnostic entity AP (evaluator_type "entity") on the GT that
  datasets/prepare_entity_gt.py makes from the panoptic GT (one category, stock pycocotools).
"""
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, register_coco_panoptic
from detectron2.data.datasets.builtin_meta import _get_builtin_metadata

__all__ = ["register_coco_panoptic_crm", "register_entity_crm", "register_all_crm", "ENTITY_JSON"]

ENTITY_JSON = "coco/annotations/entity_crm_val2017.json"
_PANOPTIC = {
    # name: (image root, panoptic PNG root, panoptic JSON), relative to $DETECTRON2_DATASETS
    "coco_2017_val_panoptic_crm": ("coco/val2017", "coco/panoptic_val2017", "coco/annotations/panoptic_val2017.json"),
}
_ENTITY = {"coco_2017_val_entity_crm": ("coco/val2017", ENTITY_JSON)}


def register_coco_panoptic_crm(name, image_root, panoptic_root, panoptic_json):
    """Register a COCO-panoptic split with the "separated" metadata (things 0..79, stuff 1..53, 0 = things)."""
    register_coco_panoptic(name, _get_builtin_metadata("coco_panoptic_separated"), image_root, panoptic_root,
                           panoptic_json)


def register_entity_crm(name, image_root, json_file):
    """Register a class-agnostic entity split (COCO instances JSON, e.g. from datasets/prepare_entity_gt.py)."""
    DatasetCatalog.register(name, lambda: load_coco_json(json_file, image_root, name))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="entity")


def register_all_crm(root=None):
    root = root or os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
    known = set(DatasetCatalog.list())
    for name, (images, pngs, json_file) in _PANOPTIC.items():
        if name not in known:
            register_coco_panoptic_crm(name, os.path.join(root, images), os.path.join(root, pngs),
                                       os.path.join(root, json_file))
    for name, (images, json_file) in _ENTITY.items():
        if name not in known:
            register_entity_crm(name, os.path.join(root, images), os.path.join(root, json_file))


register_all_crm()
