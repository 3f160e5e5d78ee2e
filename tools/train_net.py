#!/usr/bin/env python3
"""Detectron2 training / evaluation with CRM post-refinement (no fine-tuning of CRM).

    # base and CRM-refined results of one forward pass per image, with the with/without table:
    python tools/train_net.py --config-file configs/PanopticFPN-R50-CRM.yaml --eval-only \
        MODEL.WEIGHTS base.pkl MODEL.CRM.WEIGHTS crm.pth [--num-gpus 8]

Outputs (OUTPUT_DIR/inference/<dataset>/): crm_comparison.txt/.json (with the per-category numbers), per side
(base/, crm/) the kept predictions: COCO panoptic predictions.json + predictions/*.png, or instances_results.json;
with `MODEL.CRM.REPORT True`, report/index.html: a page to look at what refinement changed (crm_d2.report).
Training (without --eval-only) trains the base model as its own project does; CRM is frozen and unused then.
"""
import os

from crm_d2.optional import require_detectron2

require_detectron2("tools/train_net.py")

import detectron2.utils.comm as comm
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils.logger import setup_logger

from crm_d2.d2 import build_crm_evaluator, get_crm_cfg, return_base_outputs


class Trainer(DefaultTrainer):
    """DefaultTrainer whose evaluation compares the base and the CRM-refined outputs of the same forward."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_crm_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        with return_base_outputs(model):
            return super().test(cfg, model, evaluators)


def setup(args):
    cfg = get_crm_cfg(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="crm_d2", abbrev_name="crm")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main():
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))


if __name__ == "__main__":
    invoke_main()
