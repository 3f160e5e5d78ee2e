#!/usr/bin/env python
"""Training throughput of a config: the model step and the data loading measured apart, in samples per second.

    python tools/maintain/train_speed.py --config configs/training/crm_demo.yaml --threads 1 2
    python tools/maintain/train_speed.py --config configs/training/crm_demo.yaml --dense   # the released recipe's decoding

The model step (forward, loss, backward, Adam) runs on batches drawn once from the config's data (so loading
does not count), mean of --steps after --warmup (steps differ by the input scale drawn); loading is the
dataset's __getitem__ (crop, jitter, coarse mask synthesis) in this process. Keep the machine otherwise idle: a loaded 2-core CPU makes these figures lie.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time

import torch

from crm_d2.train.config import load_config
from crm_d2.train.trainer import Trainer


def measure(config, overrides, threads, steps, warmup, samples):
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(config, list(overrides) + [f"output_dir={out}", "data.num_workers=0", "cpu_threads="
                                                     f"{threads}", "log.tensorboard=false", "device=cpu"])
        trainer = Trainer(cfg)
        loader, _ = trainer.train_loader()
        it = iter(loader)
        batches = [next(it) for _ in range(4)]
        times = []
        for k in range(warmup + steps):
            t = time.perf_counter()
            trainer.step(batches[k % len(batches)])
            times.append(time.perf_counter() - t)
        step = statistics.mean(times[warmup:])  # the mean: steps differ by the input scale drawn
        dataset = loader.dataset
        t = time.perf_counter()
        for k in range(samples):
            dataset[(k % len(dataset), 10_000 + k)]
        load = (time.perf_counter() - t) / samples
    batch = cfg["solver"]["batch_size"]
    return {"threads": threads, "batch": batch, "crop": cfg["data"]["crop_size"], "step_s": step,
            "model_samples_per_s": batch / step, "load_samples_per_s": 1 / load}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--samples", type=int, default=64, help="samples for the loading measurement")
    p.add_argument("--dense", action="store_true", help="decode every pixel at full input resolution (released)")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    args = p.parse_args(argv)
    overrides = list(args.overrides)
    if args.dense:
        overrides += ["sampling={points: 0, tile: 0}", "data.input_scales=[1.0]", "solver.channels_last=false"]
    rows = [measure(args.config, overrides, t, args.steps, args.warmup, args.samples) for t in args.threads]
    if args.json:
        print(json.dumps(rows))
    else:
        print(f"{args.config} {' '.join(overrides)}")
        for r in rows:
            print(f"  {r['threads']} thread(s), batch {r['batch']} x {r['crop']} px: step {r['step_s']:.3f} s = "
                  f"{r['model_samples_per_s']:.1f} samples/s; loading {r['load_samples_per_s']:.1f} samples/s/core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
