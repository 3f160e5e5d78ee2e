"""Detectron2 evaluators backed by the crm_d2 core, and the same-pass with/without-CRM comparison.

- CRMPanopticEvaluator: COCO panoptic PQ with crm_d2.panoptic.pq (no panopticapi); the prediction PNGs and JSON
  are kept in `output_dir` (Detectron2's COCOPanopticEvaluator writes them to a temporary folder).
- CRMInstanceEvaluator: mask AP with stock pycocotools through crm_d2.panoptic.instances_eval, class-agnostic
  (entities) or per class.
- CRMComparisonEvaluator: one model forward per image, base outputs to one evaluator set and refined outputs to
  another (see crm_d2.d2.meta_arch.return_base_outputs), a with/without table, the per-category numbers
  (crm_d2.panoptic.per_category, as the CLI computes them) and, with MODEL.CRM.REPORT, the report page
  (crm_d2.report, as `crm-d2 panoptic --report` writes it).

Like Detectron2's evaluators, predictions are gathered to the main process with detectron2.utils.comm.
"""
import copy
import itertools
import json
import logging
import math
import os
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np
from tabulate import tabulate

from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator, DatasetEvaluators, SemSegEvaluator
from detectron2.utils import comm

from crm_d2.io import atomic_write, write_json
from crm_d2.panoptic.coco import PanopticSet, check_segments, id2rgb, write_panoptic_json
from crm_d2.panoptic.instances_eval import (
    AP_KEYS,
    ENTITY_CATEGORY,
    encode_results,
    entity_gt_from_panoptic,
    evaluate_masks,
    format_ap_table,
)
from crm_d2.panoptic.per_category import combine, format_changes, panoptic_per_category
from crm_d2.panoptic.pq import format_pq_table, pq_compute
from crm_d2.report import comparison_groups, instances_report, panoptic_report, report_source

from .meta_arch import BASE_OUTPUTS_KEY

__all__ = ["CRMPanopticEvaluator", "CRMInstanceEvaluator", "CRMComparisonEvaluator", "build_evaluator",
           "build_crm_evaluator", "format_comparison"]

logger = logging.getLogger(__name__)


def _gather(items):
    """All processes' lists, concatenated on the main process (None elsewhere)."""
    comm.synchronize()
    parts = comm.gather(items, dst=0)
    if not comm.is_main_process():
        return None
    return list(itertools.chain(*parts))


class CRMPanopticEvaluator(DatasetEvaluator):
    """COCO panoptic PQ of `output["panoptic_seg"]` with the core PQ; keeps the predictions.

    Writes `output_dir/predictions.json` and `output_dir/predictions/<image>.png` (the COCO panoptic layout that
    `crm-d2 pq --pred-json output_dir/predictions.json` reads). Without `output_dir` a temporary folder is used.
    """

    def __init__(self, dataset_name, output_dir=None, name=None):
        self._metadata = MetadataCatalog.get(dataset_name)
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._name = name or dataset_name
        self._thing_ids = {v: k for k, v in self._metadata.get("thing_dataset_id_to_contiguous_id", {}).items()}
        self._stuff_ids = {v: k for k, v in self._metadata.get("stuff_dataset_id_to_contiguous_id", {}).items()}
        for key in ("panoptic_json", "panoptic_root"):
            if not self._metadata.get(key, None):
                raise ValueError(f"dataset {dataset_name!r} has no metadata {key!r}: register it with "
                                 "detectron2.data.datasets.register_coco_panoptic(_separated)")

    def reset(self):
        self._predictions = []

    def _dataset_category(self, seg):
        """Contiguous (model) category id -> dataset category id, as Detectron2's COCOPanopticEvaluator does."""
        seg = dict(seg)
        isthing = seg.pop("isthing", None)
        if isthing is None:  # the model already returns dataset ids
            return seg
        table = self._thing_ids if isthing else self._stuff_ids
        if seg["category_id"] not in table:
            raise ValueError(f"{'thing' if isthing else 'stuff'} category {seg['category_id']} of segment "
                             f"{seg['id']} has no dataset id in the metadata of {self._dataset_name!r}")
        seg["category_id"] = table[seg["category_id"]]
        return seg

    def _from_label_divisor(self, ids):
        """category * label_divisor + instance maps (no segments_info; -1 = void) -> ids and segments_info."""
        divisor = self._metadata.label_divisor
        thing_contiguous = set(self._metadata.thing_dataset_id_to_contiguous_id.values())
        segments = []
        for label in np.unique(ids):
            if label == -1:
                continue
            category = int(label) // divisor
            segments.append({"id": int(label) + 1, "category_id": category, "isthing": category in thing_contiguous})
        return ids + 1, segments

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            ids, segments_info = out["panoptic_seg"]
            ids = ids.cpu().numpy()
            if segments_info is None:
                ids, segments_info = self._from_label_divisor(ids)
            file_name = os.path.splitext(os.path.basename(inp["file_name"]))[0] + ".png"
            check_segments(ids, segments_info, where=f"panoptic_seg of {inp['file_name']}")
            ok, png = cv2.imencode(".png", id2rgb(ids)[..., ::-1])
            if not ok:
                raise ValueError(f"could not encode the panoptic PNG of {inp['file_name']}")
            self._predictions.append({
                "image_id": inp["image_id"],
                "file_name": file_name,
                "png": png.tobytes(),
                "segments_info": [self._dataset_category(s) for s in segments_info],
            })

    def evaluate(self):
        predictions = _gather(self._predictions)
        if predictions is None:
            return None
        if self._output_dir:
            return self._write_and_score(predictions, self._output_dir)
        with tempfile.TemporaryDirectory(prefix="crm_panoptic_eval") as tmp:
            return self._write_and_score(predictions, tmp)

    def _write_and_score(self, predictions, out_dir):
        png_dir = os.path.join(out_dir, "predictions")
        for p in predictions:  # atomic, so a killed evaluation never leaves a half PNG next to the JSON
            data = p.pop("png")
            atomic_write(os.path.join(png_dir, p["file_name"]), lambda tmp: Path(tmp).write_bytes(data), ".png")
        gt = PanopticSet(self._metadata.panoptic_json, self._metadata.panoptic_root)  # read once, scored below
        pred_json = os.path.join(out_dir, "predictions.json")
        write_panoptic_json(pred_json, predictions, gt.data.get("categories", []), images=gt.data.get("images", []))
        logger.info(f"panoptic predictions of {self._name} written to {pred_json} and {png_dir}")
        res = pq_compute(gt, None, pred_json, png_dir)
        # what the comparison needs for per-category numbers and the report (the files are gone without
        # output_dir; the report is then not written)
        self.evaluated = {"pq": res, "gt": gt,
                          "pred": PanopticSet(pred_json, png_dir) if self._output_dir else None}
        logger.info(f"Panoptic evaluation of {self._name}:\n" + format_pq_table({self._name: res}))
        metrics = OrderedDict()
        for suffix, group in (("", "all"), ("_th", "things"), ("_st", "stuff")):
            for key in ("pq", "sq", "rq"):
                metrics[key.upper() + suffix] = float(res[group][key])
        return OrderedDict(panoptic_seg=metrics)


class CRMInstanceEvaluator(DatasetEvaluator):
    """Mask AP of `output["instances"]` with stock pycocotools (crm_d2.panoptic.instances_eval).

    class_agnostic=True is the entity protocol (every GT segment one entity, one category). GT: metadata
    `json_file` (COCO instances format; for entities datasets/prepare_entity_gt.py makes it) or, for a panoptic
    dataset without one, entities made from its panoptic GT. Results are kept as output_dir/instances_results.json.
    """

    def __init__(self, dataset_name, output_dir=None, class_agnostic=True, name=None):
        self._metadata = MetadataCatalog.get(dataset_name)
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._class_agnostic = bool(class_agnostic)
        self._name = name or dataset_name

    def reset(self):
        self._predictions = []

    def process(self, inputs, outputs):
        # read here, not in __init__: load_coco_json fills the id map when the dataset is first loaded
        to_dataset = {v: k for k, v in self._metadata.get("thing_dataset_id_to_contiguous_id", {}).items()}
        for inp, out in zip(inputs, outputs):
            inst = out["instances"]
            if len(inst) == 0 or isinstance(inst.pred_masks, list):  # PanopticFCN: empty lists
                continue
            masks = inst.pred_masks
            masks = getattr(masks, "tensor", masks).detach().cpu().numpy()
            masks = masks > 0.5 if masks.dtype.kind == "f" else masks.astype(bool)  # EntitySeg: float 0/1
            scores = inst.scores.detach().float().cpu().numpy()
            if self._class_agnostic:
                categories = ENTITY_CATEGORY["id"]
            else:
                classes = inst.pred_classes.detach().cpu().numpy().tolist()
                categories = [to_dataset.get(int(c), int(c)) for c in classes]
            self._predictions.extend(encode_results(inp["image_id"], masks, scores, categories))

    def evaluate(self):
        predictions = _gather(self._predictions)
        if predictions is None:
            return None
        if self._output_dir:
            os.makedirs(self._output_dir, exist_ok=True)
            write_json(os.path.join(self._output_dir, "instances_results.json"), predictions)
        gt = self._gt()
        if not predictions:
            logger.warning(f"{self._name}: no instance predictions; mask AP is 0")
            res, rows, names = {k: 0.0 for k in AP_KEYS}, {}, {}
        else:
            res, rows, names = evaluate_masks(gt, predictions, class_agnostic=self._class_agnostic,
                                              per_category=True)
        self.evaluated = {"rows": rows, "names": names, "gt": gt, "results": predictions,
                          "class_agnostic": self._class_agnostic}
        logger.info(f"Mask AP of {self._name}:\n" + format_ap_table({self._name: res}))
        return OrderedDict(segm=OrderedDict((k, float(res[k])) for k in AP_KEYS))

    def _gt(self):
        """GT as a COCO instances dict/path: metadata json_file, else entities from the panoptic GT."""
        json_file = self._metadata.get("json_file", None)
        if json_file:
            return json_file
        if self._metadata.get("panoptic_json", None) and self._class_agnostic:
            return entity_gt_from_panoptic((self._metadata.panoptic_json, self._metadata.panoptic_root))
        raise ValueError(f"dataset {self._dataset_name!r} has neither a 'json_file' (instances GT) nor a panoptic "
                         "GT to make entities from")


class CRMComparisonEvaluator(DatasetEvaluator):
    """Evaluate base and CRM-refined outputs of the same forward pass.

    The model must run inside `crm_d2.d2.return_base_outputs(model)`, so that each output carries the unrefined
    outputs under BASE_OUTPUTS_KEY; outputs without it go to both sides. Returns {"base/<task>": ...,
    "crm/<task>": ...} and logs (and writes to `output_dir`) the with/without table.

    crm_evaluator=None (MODEL.CRM.ENABLED False): refinement is the identity, so the base outputs are evaluated
    once and the CRM side is a copy of them (numbers and files): the layout, keys and table stay those of a
    run with CRM, so scripts that read them work with either setting.
    """

    def __init__(self, base_evaluator, crm_evaluator, output_dir=None, name="", side_dirs=None, report=False):
        self._base = base_evaluator
        self._crm = crm_evaluator
        self._output_dir = output_dir
        self._name = name
        self._crm_enabled = crm_evaluator is not None
        self._side_dirs = side_dirs  # (base, crm) output folders, for the copy when CRM is off
        self._report = bool(report) and bool(output_dir)

    def reset(self):
        self._base.reset()
        if self._crm_enabled:
            self._crm.reset()
        self._missing_base = False
        self._photos = []  # (image_id, file_name): where the report finds each photo

    def process(self, inputs, outputs):
        if self._report:
            self._photos.extend((inp["image_id"], inp["file_name"]) for inp in inputs if "file_name" in inp)
        base, refined = [], []
        for out in outputs:
            if BASE_OUTPUTS_KEY not in out:
                self._missing_base = True
            base.append(out.get(BASE_OUTPUTS_KEY, out))
            refined.append({k: v for k, v in out.items() if k != BASE_OUTPUTS_KEY})
        self._base.process(inputs, base)
        if self._crm_enabled:
            self._crm.process(inputs, refined)

    def evaluate(self):
        if self._missing_base and self._crm_enabled:
            logger.warning("outputs had no base results (the model did not run inside return_base_outputs): "
                           "both columns evaluate the same outputs")
        base = self._base.evaluate()
        crm = self._crm.evaluate() if self._crm_enabled else copy.deepcopy(base)
        photos = _gather(self._photos) if self._report else []  # collective: every rank has the same _report
        if not comm.is_main_process():
            return None
        base, crm = base or {}, crm or {}
        if not self._crm_enabled:
            logger.info("MODEL.CRM.ENABLED is False: the 'with CRM' column and crm/ are the base model's")
            if self._side_dirs and os.path.isdir(self._side_dirs[0]):
                shutil.copytree(self._side_dirs[0], self._side_dirs[1], dirs_exist_ok=True)
        table = format_comparison(base, crm)
        base_eval = getattr(self._base, "evaluated", None)
        crm_eval = getattr(self._crm, "evaluated", None) if self._crm_enabled else base_eval
        per_category = evaluation_per_category(base_eval, crm_eval)
        changes = "\n" + format_changes(per_category) if per_category else ""
        logger.info(f"CRM with/without{' on ' + self._name if self._name else ''}:\n{table}{changes}")
        if self._output_dir:
            os.makedirs(self._output_dir, exist_ok=True)
            with open(os.path.join(self._output_dir, "crm_comparison.txt"), "w") as f:
                f.write(table + changes + "\n")
            write_json(os.path.join(self._output_dir, "crm_comparison.json"),
                       {"base": base, "crm": crm, "crm_enabled": self._crm_enabled, "per_category": per_category})
        if self._report and base_eval is not None and crm_eval is not None:
            page = write_evaluation_report(os.path.join(self._output_dir, "report"), base_eval, crm_eval,
                                           dict(photos), comparison_groups(base, crm), per_category,
                                           report_source("train_net", self._output_dir),
                                           title=f"CRM on {self._name}")
            logger.info(f"report of {self._name}: {page}")
        results = OrderedDict()
        for prefix, res in (("base", base), ("crm", crm)):
            for task, metrics in res.items():
                results[f"{prefix}/{task}"] = metrics
        return results


def evaluation_per_category(base_eval, crm_eval):
    """The per-category table of two evaluators' `evaluated` records ({} when one is missing), computed by
    crm_d2.panoptic.per_category as the CLI computes it."""
    if base_eval is None or crm_eval is None:
        return {}
    if "pq" in base_eval:
        return panoptic_per_category(base_eval["pq"], crm_eval["pq"])
    return combine(base_eval["rows"], crm_eval["rows"], {**base_eval["names"], **crm_eval["names"]})


def write_evaluation_report(report_dir, base_eval, crm_eval, photos, comparison, per_category, source, title):
    """The report (crm_d2.report) from two evaluators' `evaluated` records; photos: {image_id: file_name}.
    The folder is this evaluation's own output, so an earlier report there is replaced. None when the
    predictions were not kept (an evaluator without output_dir)."""
    def image_path(image_id, _):
        if image_id not in photos:
            raise ValueError(f"the report needs the photo of image_id {image_id}, which no input named")
        return photos[image_id]

    if "pq" in base_eval:
        if base_eval["pred"] is None or crm_eval["pred"] is None:
            return None
        return panoptic_report(report_dir, base_eval["gt"], base_eval["pred"], crm_eval["pred"], image_path,
                               comparison, per_category, source, overwrite=True, title=title)
    gt = base_eval["gt"]
    if not isinstance(gt, dict):
        with open(gt) as f:
            gt = json.load(f)
    return instances_report(report_dir, gt, base_eval["results"], crm_eval["results"], image_path, comparison,
                            per_category, source, overwrite=True, class_agnostic=base_eval["class_agnostic"],
                            title=title)


def format_comparison(base, crm):
    """Text table, one row per task/metric: without CRM, with CRM, difference."""
    rows = []
    for task in list(dict.fromkeys(list(base) + list(crm))):
        b, c = base.get(task, {}), crm.get(task, {})
        for metric in dict.fromkeys(list(b) + list(c)):
            vb, vc = b.get(metric), c.get(metric)
            diff = vc - vb if isinstance(vb, (int, float)) and isinstance(vc, (int, float)) else None
            diff = None if diff is not None and math.isnan(diff) else diff  # e.g. APl with no large GT
            rows.append([f"{task}/{metric}", vb, vc, diff])
    return tabulate(rows, headers=["metric", "without CRM", "with CRM", "difference"], tablefmt="pipe",
                    floatfmt=("", ".3f", ".3f", "+.3f"), missingval="-")


def build_evaluator(cfg, dataset_name, output_dir=None, name=None):
    """Evaluator(s) for one dataset by its `evaluator_type`, on the core metrics where the core has them."""
    meta = MetadataCatalog.get(dataset_name)
    kind = meta.get("evaluator_type", None)
    evaluators = []
    if kind == "coco_panoptic_seg":
        evaluators.append(CRMPanopticEvaluator(dataset_name, output_dir, name=name))
    elif kind in ("coco", "entity"):
        agnostic = kind == "entity" or bool(cfg.TEST.get("CLASS_AGNOSTIC", False))
        evaluators.append(CRMInstanceEvaluator(dataset_name, output_dir, class_agnostic=agnostic, name=name))
    elif kind == "sem_seg":
        evaluators.append(SemSegEvaluator(dataset_name, distributed=True, output_dir=output_dir))
    if not evaluators:
        raise NotImplementedError(f"no CRM evaluator for dataset {dataset_name!r} of evaluator_type {kind!r} "
                                  "(supported: coco_panoptic_seg, coco, entity, sem_seg)")
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)


def build_crm_evaluator(cfg, dataset_name, output_dir):
    """Base and refined evaluator sets in one CRMComparisonEvaluator (outputs in output_dir/base,
    output_dir/crm, the table in output_dir/crm_comparison.*), with CRM on or off: one layout."""
    enabled = cfg.MODEL.META_ARCHITECTURE == "CRMPostRefiner" and bool(cfg.MODEL.CRM.ENABLED)
    dirs = (os.path.join(output_dir, "base"), os.path.join(output_dir, "crm"))
    base = build_evaluator(cfg, dataset_name, dirs[0], name=f"{dataset_name} (base)")
    crm = build_evaluator(cfg, dataset_name, dirs[1], name=f"{dataset_name} (CRM)") if enabled else None
    return CRMComparisonEvaluator(base, crm, output_dir=output_dir, name=dataset_name, side_dirs=dirs,
                                  report=bool(cfg.MODEL.CRM.get("REPORT", False)))
