#!/usr/bin/env python3
"""Pictures of a Detectron2 model's result without and with CRM, side by side.

    python tools/demo.py --config-file configs/PanopticFPN-R50-CRM.yaml --input a.jpg b.jpg --output vis/ \
        --opts MODEL.WEIGHTS base.pkl MODEL.CRM.WEIGHTS crm.pth

One forward per image; writes <output>/<image stem>.png (left: base model, right: CRM-refined; PNG, so that the
boundaries being compared are not blurred by JPEG).
"""
import argparse
import glob
import os

import numpy as np
import torch
import tqdm

from crm_d2.optional import require_detectron2

require_detectron2("tools/demo.py")

import detectron2.data.transforms as T
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import Instances
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import ColorMode, Visualizer

from crm_d2.d2 import BASE_OUTPUTS_KEY, get_crm_cfg, return_base_outputs
from crm_d2.io import read_image, write_image


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="a configs/*-CRM.yaml file")
    parser.add_argument("--input", nargs="+", required=True, help="images, or glob patterns such as 'dir/*.jpg'")
    parser.add_argument("--output", required=True, help="folder for the side-by-side pictures")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    return parser


def draw(image_rgb, output, metadata):
    """One picture of one output dict: panoptic if present, else instances, else semantic."""
    vis = Visualizer(image_rgb, metadata, instance_mode=ColorMode.IMAGE)
    if "panoptic_seg" in output:
        pan, segments_info = output["panoptic_seg"]
        return vis.draw_panoptic_seg(pan.cpu(), segments_info).get_image()
    if "instances" in output:
        inst = output["instances"].to("cpu")
        if inst.has("pred_masks") and isinstance(inst.pred_masks, list):  # PanopticFCN with no things
            inst = Instances(inst.image_size)
        return vis.draw_instance_predictions(inst).get_image()
    if "sem_seg" in output:
        return vis.draw_sem_seg(output["sem_seg"].argmax(dim=0).cpu()).get_image()
    raise ValueError(f"nothing to draw in outputs with keys {sorted(output)}")


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="crm_d2")
    cfg = get_crm_cfg(args.config_file, args.opts)
    cfg.freeze()
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)

    paths = []
    for pattern in args.input:
        found = sorted(glob.glob(os.path.expanduser(pattern)))
        if not found:
            raise FileNotFoundError(f"no image matches {pattern}")
        paths.extend(found)
    os.makedirs(args.output, exist_ok=True)
    for path in tqdm.tqdm(paths, desc="demo", unit="img"):
        rgb = read_image(path)
        model_image = rgb if cfg.INPUT.FORMAT == "RGB" else rgb[..., ::-1]
        resized = resize.get_transform(model_image).apply_image(model_image)
        inp = {"image": torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1))),
               "height": rgb.shape[0], "width": rgb.shape[1], "file_name": path}
        with torch.no_grad(), return_base_outputs(model):
            refined = model([inp])[0]
        base = refined.pop(BASE_OUTPUTS_KEY, refined)
        picture = np.concatenate([draw(rgb, base, metadata), draw(rgb, refined, metadata)], axis=1)
        write_image(os.path.join(args.output, os.path.splitext(os.path.basename(path))[0] + ".png"), picture)
    print(f"{len(paths)} picture(s) in {args.output} (left: base model, right: with CRM)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
