#!/usr/bin/env python
"""Detectron2-style entry point for training CRM: `crm-d2 train` plus --num-gpus.

    python tools/train_crm.py --config-file configs/training/crm_r50_paper.yaml --num-gpus 8 [--resume] [KEY=VALUE ...]

Every other option is `crm-d2 train`'s (`crm-d2 train --help`). --num-gpus N > 1 re-launches this script through
torchrun (one process per GPU); the trainer reads torchrun's env vars.
"""
import argparse
import os
import subprocess
import sys

from crm_d2 import cli


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    gpus = argparse.ArgumentParser(add_help=False)
    gpus.add_argument("--num-gpus", type=int, default=1)
    known, rest = gpus.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        print("tools/train_crm.py: `crm-d2 train` (below) plus\n  --num-gpus N          processes, one per GPU: N > 1 "
              "re-launches this script through torchrun (default: 1)\n")
    if known.num_gpus > 1 and "WORLD_SIZE" not in os.environ:
        return subprocess.call([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={known.num_gpus}",
                                os.path.abspath(__file__), *rest])
    return cli.main(["train", *rest])


if __name__ == "__main__":
    sys.exit(main())
