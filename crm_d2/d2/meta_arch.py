"""`CRMPostRefiner`: any Detectron2 meta-architecture, with its inference outputs refined by CRM.

The registered builder makes the base meta-architecture named in MODEL.CRM.BASE_META_ARCHITECTURE and gives the
instance a subclass of its own class that only extends `forward` at inference. Why a subclass and not a wrapper
module: parameter names, attributes (`model.backbone`, `model.device`, ...) and checkpoints stay exactly the
base model's, so model-zoo weights load with DetectionCheckpointer unchanged and a checkpoint trained under the
wrapper is a plain base checkpoint. The CRM network is kept outside the module tree: frozen, never in the
state_dict or the optimizer, unused in training.

At inference the base outputs are refined on the original-resolution image, read (RGB) from the input's
`file_name`; the refinement itself is crm_d2.panoptic.refine (framework-free). Outputs keep the base model's keys
and types. For same-pass evaluation, `return_base_outputs(model)` makes every output dict also carry the
unrefined dict under BASE_OUTPUTS_KEY (see crm_d2.d2.evaluation.CRMComparisonEvaluator).
"""
import contextlib
import dataclasses
import logging
import sys

import cv2
import numpy as np
import torch

from detectron2.data.detection_utils import convert_image_to_rgb
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import BitMasks, Instances

from crm_d2.io import read_image
from crm_d2.panoptic.refine import SegmentRefineOptions, refine_instances, refine_panoptic
from crm_d2.refiner import Refiner

from .config import REFINABLE_OUTPUTS

__all__ = ["CRMPostRefiner", "CRMRefinementMixin", "BASE_OUTPUTS_KEY", "return_base_outputs"]

BASE_OUTPUTS_KEY = "crm_base"
logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
def CRMPostRefiner(cfg):
    """Build MODEL.CRM.BASE_META_ARCHITECTURE and add CRM refinement to its inference outputs."""
    name = cfg.MODEL.CRM.BASE_META_ARCHITECTURE
    if name == "CRMPostRefiner":
        raise ValueError("MODEL.CRM.BASE_META_ARCHITECTURE cannot be CRMPostRefiner itself")
    if name not in META_ARCH_REGISTRY:
        raise KeyError(
            f"MODEL.CRM.BASE_META_ARCHITECTURE {name!r} is not registered (known: "
            f"{', '.join(sorted(k for k, _ in META_ARCH_REGISTRY))}); build the config with "
            "crm_d2.d2.get_crm_cfg, which imports PanopticFCN / EntitySeg when they are used"
        )
    base_cfg = cfg.clone()
    base_cfg.defrost()
    base_cfg.MODEL.META_ARCHITECTURE = name  # as if the base were built directly
    model = META_ARCH_REGISTRY.get(name)(base_cfg)
    model.__class__ = _crm_class(type(model))
    model._init_crm(cfg)
    return model


def _crm_class(base_cls):
    """CRM<Base>: the base class with CRMRefinementMixin in front, made once per base class."""
    if issubclass(base_cls, CRMRefinementMixin):
        return base_cls
    name = f"CRM{base_cls.__name__}"
    module = sys.modules[__name__]
    cls = getattr(module, name, None)
    if cls is None or cls.__bases__ != (CRMRefinementMixin, base_cls):
        cls = type(name, (CRMRefinementMixin, base_cls), {"__module__": __name__, "__qualname__": name})
        setattr(module, name, cls)  # picklable by name
    return cls


@contextlib.contextmanager
def return_base_outputs(model, enabled=True):
    """Within the block, inference outputs also carry the unrefined outputs under BASE_OUTPUTS_KEY."""
    inner = getattr(model, "module", model)  # DistributedDataParallel
    if not isinstance(inner, CRMRefinementMixin):
        yield model
        return
    before = inner.crm_return_base
    inner.crm_return_base = enabled
    try:
        yield model
    finally:
        inner.crm_return_base = before


class CRMRefinementMixin:
    """Refines the outputs of the class it is mixed in front of; see the module docstring."""

    def _init_crm(self, cfg):
        c = cfg.MODEL.CRM
        self.crm_enabled = bool(c.ENABLED)
        self.crm_return_base = False
        unknown = sorted(set(c.REFINE) - set(REFINABLE_OUTPUTS))
        if unknown:
            raise ValueError(f"MODEL.CRM.REFINE has unknown outputs {unknown}; choose from {REFINABLE_OUTPUTS}")
        self.crm_refine = tuple(c.REFINE)
        self.crm_non_overlapping = bool(c.NON_OVERLAPPING_INSTANCES)
        self.crm_input_format = cfg.INPUT.FORMAT
        self.crm_options = SegmentRefineOptions(
            targets=c.TARGETS, min_area=int(c.MIN_AREA), margin=float(c.ROI_MARGIN),
            max_side=int(c.MAX_SIDE), batch_size=int(c.BATCH_SIZE), merge=c.MERGE,
            band=float(c.BAND) or None, drop_empty=bool(c.DROP_EMPTY),
        )
        refiner = None
        if self.crm_enabled:
            if not c.WEIGHTS:
                raise ValueError("MODEL.CRM.ENABLED is True but MODEL.CRM.WEIGHTS is empty: give a CRM checkpoint "
                                 "(or 'demo'), or set MODEL.CRM.ENABLED False for the base model alone")
            scales = "auto" if list(c.SCALES) == ["auto"] else tuple(c.SCALES) or None
            refiner = Refiner(c.WEIGHTS, device=cfg.MODEL.DEVICE, scales=scales, amp=bool(c.AMP),
                              max_batch=int(c.BATCH_SIZE), mode="fast" if c.FAST else "exact",
                              edge_snap=str(c.EDGE_SNAP), rounds=str(c.ROUNDS),
                              grabcut=str(c.GRABCUT))
        # Not an attribute nn.Module tracks: CRM stays out of state_dict(), parameters() and .to().
        object.__setattr__(self, "crm_refiner", refiner)
        self._crm_warned = set()

    def forward(self, batched_inputs):
        outputs = super().forward(batched_inputs)
        if self.training or not self.crm_enabled:
            return outputs
        return [self.crm_refine_output(inp, out) for inp, out in zip(batched_inputs, outputs)]

    # ----------------------------------------------------------------------------------------- per image
    def crm_refine_output(self, inp, out):
        """One image: a new output dict with the selected outputs refined (the base dict is not modified)."""
        new = dict(out)
        todo = [k for k in self.crm_refine if k in out]
        if todo:
            image = self._crm_image(inp, _output_size(inp, out))
            where = str(inp.get("file_name", inp.get("image_id", "")))
            if "panoptic_seg" in todo:
                new["panoptic_seg"] = self._crm_panoptic(image, out["panoptic_seg"], where)
            if "instances" in todo:
                new["instances"] = self._crm_instances(image, out["instances"], where)
            if "sem_seg" in todo:
                new["sem_seg"] = self._crm_sem_seg(image, out["sem_seg"], where)
        if self.crm_return_base:
            new[BASE_OUTPUTS_KEY] = out
        return new

    def _warn_once(self, key, msg):
        if key not in self._crm_warned:
            self._crm_warned.add(key)
            logger.warning(msg)

    def _crm_image(self, inp, size):
        """The original image, RGB uint8, at the output size: from `file_name`, else from the (resized) input."""
        if "file_name" in inp:
            image = read_image(inp["file_name"])
        else:
            self._warn_once("no_file_name", "inputs have no 'file_name': CRM refines on the resized model input, "
                            "not on the original-resolution image")
            chw = inp["image"].permute(1, 2, 0).cpu().numpy()
            image = np.ascontiguousarray(convert_image_to_rgb(chw, self.crm_input_format)).astype(np.uint8)
        if image.shape[:2] != tuple(size):
            self._warn_once("resize", f"image {image.shape[1]}x{image.shape[0]} resized to the output size "
                            f"{size[1]}x{size[0]} (WxH) for CRM")
            interp = cv2.INTER_AREA if image.shape[0] > size[0] else cv2.INTER_LINEAR
            image = cv2.resize(image, (size[1], size[0]), interpolation=interp)
        return image

    def _crm_panoptic(self, image, panoptic, where):
        pan, segments_info = panoptic
        if segments_info is None:  # category * label_divisor + instance map (Panoptic-DeepLab): no segment list
            self._warn_once("pan_none", "panoptic_seg without segments_info is not refined")
            return panoptic
        pan_np = pan.cpu().numpy()
        new_pan, new_segments = refine_panoptic(self.crm_refiner, image, pan_np, segments_info,
                                                self.crm_options, where=where)
        new_pan = torch.from_numpy(np.ascontiguousarray(new_pan, dtype=pan_np.dtype)).to(pan.device)
        # the core adds `area` to every segment; keep the base model's own keys (it is updated where present)
        no_area = {s["id"] for s in segments_info if "area" not in s}
        new_segments = [{k: v for k, v in s.items() if k != "area" or s["id"] not in no_area} for s in new_segments]
        return new_pan, new_segments

    def _crm_instances(self, image, instances, where):
        if not instances.has("pred_masks") or len(instances) == 0:
            return instances
        masks = instances.pred_masks
        if isinstance(masks, list):  # PanopticFCN with no things: empty Python lists
            return instances
        tensor = masks.tensor if isinstance(masks, BitMasks) else masks
        if not torch.is_tensor(tensor) or tensor.dim() != 3:
            self._warn_once("mask_type", f"instances.pred_masks of type {type(masks).__name__} are not refined")
            return instances
        scores = instances.scores.detach().float().cpu().numpy() if instances.has("scores") else \
            np.ones(len(instances), np.float32)
        refined = refine_instances(self.crm_refiner, image, tensor.detach().cpu().numpy(), scores,
                                   self.crm_options, non_overlapping=self.crm_non_overlapping, where=where)
        refined = torch.from_numpy(refined).to(tensor.device)
        new = Instances(instances.image_size, **instances.get_fields())
        if isinstance(masks, BitMasks):
            new.pred_masks = BitMasks(refined)
        else:
            new.pred_masks = refined.to(tensor.dtype)  # bool stays bool, float 0/1 stays float 0/1
        if not self.crm_options.drop_empty:  # refinement kept every detection (empty ones keep their base mask)
            return new
        # MODEL.CRM.DROP_EMPTY: an instance refined to nothing is dropped; indexing keeps the other fields aligned
        # (a panoptic segment's `instance_id` then no longer indexes these instances).
        keep = refined.flatten(1).any(dim=1)
        return new if bool(keep.all()) else new[keep]

    def _crm_sem_seg(self, image, sem_seg, where):
        """Refine each class region of argmax(sem_seg) like a stuff segment, then move the score of the refined
        class to the top where the label changed (scores are swapped, so argmax is the refined label map)."""
        old = sem_seg.argmax(dim=0)
        labels = old.cpu().numpy().astype(np.int64)
        segments = [{"id": int(c) + 1, "category_id": int(c), "isthing": 0} for c in np.unique(labels)]
        options = dataclasses.replace(self.crm_options, targets="both")
        new_ids, _ = refine_panoptic(self.crm_refiner, image, labels + 1, segments, options, where=where)
        new = torch.from_numpy(np.asarray(new_ids, dtype=np.int64) - 1).to(old.device)
        new = torch.where(new < 0, old, new)
        ys, xs = torch.nonzero(new != old, as_tuple=True)
        if not len(ys):
            return sem_seg
        out = sem_seg.clone()
        c_old, c_new = old[ys, xs], new[ys, xs]
        s_old, s_new = sem_seg[c_old, ys, xs], sem_seg[c_new, ys, xs]  # s_old >= s_new: old was the argmax
        tie_break = torch.nextafter(s_old, torch.full_like(s_old, float("inf")))
        out[c_new, ys, xs] = torch.where(s_old > s_new, s_old, tie_break)
        out[c_old, ys, xs] = s_new
        return out


def _output_size(inp, out):
    """(H, W) of the outputs: Detectron2 returns them at the input's `height` x `width`."""
    if "panoptic_seg" in out:
        return tuple(out["panoptic_seg"][0].shape[-2:])
    if "instances" in out:
        return tuple(out["instances"].image_size)
    if "sem_seg" in out:
        return tuple(out["sem_seg"].shape[-2:])
    return inp["height"], inp["width"]
