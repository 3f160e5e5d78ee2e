#!/usr/bin/env python
"""Detectron2-style entry point for training CRM; the same as `crm-d2 train`.

    python tools/train_crm.py --config-file configs/crm_r50_paper.yaml --num-gpus 8 [--resume] [KEY=VALUE ...]

--num-gpus N > 1 re-launches itself through torchrun (one process per GPU); the trainer reads torchrun's env vars.
"""
import argparse
import os
import subprocess
import sys

from crm_d2.commands import train as train_command


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", "--config", dest="config", required=True, metavar="FILE")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes (GPUs) on this machine")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint of the output dir")
    parser.add_argument("--output", default=None, help="output folder (default: the config's output_dir)")
    parser.add_argument("--device", default=None)
    parser.add_argument("overrides", nargs=argparse.REMAINDER, metavar="KEY=VALUE",
                        help="config overrides, e.g. solver.max_iter=1000")
    args = parser.parse_args(argv)
    if args.num_gpus > 1 and "WORLD_SIZE" not in os.environ:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.num_gpus}",
               os.path.abspath(__file__), "--config", args.config]
        cmd += ["--resume"] if args.resume else []
        cmd += ["--output", args.output] if args.output else []
        cmd += ["--device", args.device] if args.device else []
        return subprocess.call(cmd + list(args.overrides))
    try:
        return train_command.run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"train_crm: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
