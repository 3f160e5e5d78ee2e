"""Train CRM (configs: `crm_d2.train.config`): the released optimisation recipe, resumable to the bit.

    crm-d2 train --config configs/training/crm_tiny_cpu.yaml solver.max_iter=100
    torchrun --nproc_per_node=8 -m crm_d2.cli train --config configs/training/crm_r50_paper.yaml

Resume contract: a checkpoint written after iteration k holds the model, optimizer, scheduler, AMP scaler, every
rank's RNG states (torch, CUDA, numpy, python) and k. The data stream is a pure function of (seed, position)
(`crm_d2.train.data.StreamSampler`), and the DataLoader draws its worker seeds from a private generator, so a run
resumed from k computes exactly what the uninterrupted run computed after k (bit-identical on CPU; on CUDA as
deterministic as the kernels are).
"""
import logging
import math
import multiprocessing
import os
import random
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.utils.data import DataLoader

from crm_d2.checkpoint import NAMED_WEIGHTS, load_checkpoint, load_state, resolve_weights, save_checkpoint
from crm_d2.distributed import init_from_env, world_from_env
from crm_d2.inputs import resize
from crm_d2.io import atomic_write
from crm_d2.model import CRM, normalize_image, normalize_input
from crm_d2.train.config import load_config, model_config
from crm_d2.train.data import CRMTrainDataset, StreamSampler, build_items, val_samples
from crm_d2.train.imagenet import load_imagenet_encoder
from crm_d2.train.losses import CRMLoss, boundary_band, draw_sample
from crm_d2.train.perturb import PerturbConfig
from crm_d2.train.resume import MetricsLog, load_scheduler_state, rng_state, scheduler_state, set_rng_state

logger = logging.getLogger("crm_d2.train")

__all__ = ["Trainer", "train_from_args", "load_imagenet_encoder", "fit_to_budget"]

# A time budget is fitted on the speed of these iterations: the first ones pay for worker start-up, cuDNN's
# algorithm search and the allocator's growth, and are left out.
BUDGET_WARMUP_ITERS = 10
BUDGET_PROBE_ITERS = 20


# ----------------------------------------------------------------------------------------------- budget
def fit_to_budget(iteration, iters_per_s, seconds_left, max_iter, steps):
    """(max_iter, steps) for `seconds_left` more seconds at `iters_per_s`, each step at the same fraction of the
    run as in the config (which then says the shape of the schedule, not its length)."""
    fitted = iteration + max(1, int(iters_per_s * max(0.0, seconds_left)))
    # A step that would fall before the next iteration (a budget spent in the probe) is taken at the next one:
    # the scheduler decays only when it reaches a milestone, so one already passed would never be taken.
    return fitted, [max(iteration + 1, round(s * fitted / max_iter)) for s in steps]


# ----------------------------------------------------------------------------------------------- helpers
_MP_CONTEXT = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else None


def _worker_init(_):
    # Loader processes handle one sample at a time: OpenCV's thread pool would only oversubscribe the cores.
    # (torch already runs its workers single-threaded.)
    import cv2

    cv2.setNumThreads(1)


def _finite(x):
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


# ----------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Builds everything from a config dict (see `load_config`) and runs `train()`."""

    def __init__(self, cfg, output_dir=None, resume=False, device=None):
        self.cfg = cfg
        self.env = init_from_env(device or cfg.get("device"))
        self.device = self.env.device
        if self.device.type == "cpu" and cfg.get("cpu_threads"):
            torch.set_num_threads(int(cfg["cpu_threads"]))
        self.out = Path(output_dir or cfg["output_dir"])
        sol = cfg["solver"]
        if sol["batch_size"] % self.env.world_size:
            raise ValueError(f"solver.batch_size {sol['batch_size']} is not divisible by {self.env.world_size} "
                             "processes")
        self.batch_per_rank = sol["batch_size"] // self.env.world_size
        self.max_iter = int(sol["max_iter"])
        seed = int(cfg["seed"])

        # Same initial weights on every rank; per-rank RNG streams afterwards (dropout differs across ranks).
        torch.manual_seed(seed)
        self.model_cfg = model_config(cfg)
        model = CRM(self.model_cfg)
        if cfg["model"]["init"]:
            n = load_imagenet_encoder(model, self._path(cfg["model"]["init"]))
            logger.info("encoder initialised from %s (%d tensors)", cfg["model"]["init"], n)
        if cfg["model"]["weights"]:
            w = cfg["model"]["weights"]
            start = load_checkpoint(resolve_weights(w) if w in NAMED_WEIGHTS else self._path(w))
            # A pixel head may be added to a model trained without one (it starts as the identity).
            added = ("pixel_head",) if self.model_cfg.pixel_head and not start["config"].pixel_head else ()
            if start["config"] != (replace(self.model_cfg, pixel_head=0) if added else self.model_cfg):
                raise ValueError(f"model.weights {cfg['model']['weights']} holds architecture "
                                 f"{start['config'].to_dict()}, the config asks for {self.model_cfg.to_dict()}")
            load_state(model, start["model"], source=str(cfg["model"]["weights"]), new_parts=added)
        self.frozen = self._freeze(model, cfg["model"]["freeze"])
        model.to(self.device)
        if sol["channels_last"]:
            model.to(memory_format=torch.channels_last)
        if sol["sync_bn"] and self.env.world_size > 1:
            if self.device.type == "cuda":
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            elif self.env.main:
                logger.warning("solver.sync_bn needs CUDA: ignored on %s", self.device)
        self.model = model
        self.ddp = None
        if self.env.world_size > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=sol["lr"],
                                          weight_decay=sol["weight_decay"])
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, list(sol["steps"]), sol["gamma"])
        self.amp = bool(sol["amp"]) and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.criterion = CRMLoss(**cfg["loss"])
        self.iteration = 0
        self.last_lr = sol["lr"]
        torch.manual_seed(seed + self.env.rank)
        np.random.seed((seed + self.env.rank) % 2**32)
        random.seed(seed + self.env.rank)

        resume_iter = None
        if not resume and self.env.main and self.last_checkpoint() is not None:
            logger.warning("%s already holds checkpoints: starting from scratch and replacing them "
                           "(pass --resume to continue instead)", self.out)
            # removed now, not overwritten one by one: the old run's later checkpoints would outlive this run's
            # pruning, and --resume or a model_final.pth would then be the old run's
            written = [*self.out.glob("model_[0-9]*.pth"), *self.out.glob("model_final*.pth")]  # only its own files
            for old in [*written, self.out / "last_checkpoint"]:
                old.unlink(missing_ok=True)
        if resume:
            ckpt = self.last_checkpoint()
            if ckpt is None:
                logger.info("--resume: no checkpoint in %s, starting from scratch", self.out)
            else:
                self._restore(ckpt)
                resume_iter = self.iteration
        if self.env.main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.jsonl = MetricsLog(self.out / "metrics.jsonl", resume_iter)
            self.tb = self._tensorboard()
            self._write_config()
        self._refiner = None

    @staticmethod
    def _freeze(model, names):
        """Stop the gradient of the named top-level parts; returns their modules (kept in eval mode)."""
        parts = dict(model.named_children())
        parts.update((n, p) for n, p in model.named_parameters(recurse=False))
        unknown = sorted(set(names) - set(parts))
        if unknown:
            raise ValueError(f"model.freeze: unknown parts {unknown}; this model has {sorted(parts)}")
        for n in names:
            for p in (parts[n].parameters() if isinstance(parts[n], torch.nn.Module) else [parts[n]]):
                p.requires_grad_(False)
        if names and not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"model.freeze {names} leaves nothing to train")
        return [parts[n] for n in names if isinstance(parts[n], torch.nn.Module)]

    # ------------------------------------------------------------------------------------------- paths
    def _path(self, p):
        p = Path(os.path.expanduser(str(p)))
        if not p.is_absolute() and self.cfg.get("_base_dir") and not p.exists():
            cand = Path(self.cfg["_base_dir"]) / p
            if cand.exists():
                return cand
        return p

    def _tensorboard(self):
        if not self.cfg["log"]["tensorboard"]:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.info("tensorboard not installed: logging to metrics.jsonl and the console only")
            return None
        return SummaryWriter(str(self.out / "tb"))

    def last_checkpoint(self):
        marker = self.out / "last_checkpoint"
        if marker.exists():
            path = self.out / marker.read_text().strip()
            if path.exists():
                return path
        found = sorted(self.out.glob("model_[0-9]*.pth"))
        return found[-1] if found else None

    # ------------------------------------------------------------------------------------------- state
    def _restore(self, path):
        ckpt = load_checkpoint(path)
        if ckpt.get("format") != "crm_d2" or "optimizer" not in ckpt:
            raise ValueError(f"{path} is not a training checkpoint (no optimizer state); use model.init for weights")
        if ckpt["config"] != self.model_cfg:
            raise ValueError(f"{path} holds architecture {ckpt['config'].to_dict()}, the config asks for "
                             f"{self.model_cfg.to_dict()}")
        load_state(self.model, ckpt["model"], source=str(path))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        load_scheduler_state(self.scheduler, ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration = int(ckpt["iteration"])
        fitted = (ckpt.get("train_config") or {}).get("solver", {})
        if self.cfg["solver"]["time_budget_s"] and fitted.get("time_budget_s") is None and fitted.get("max_iter"):
            self.max_iter = int(fitted["max_iter"])  # the length the budget was fitted to (steps: scheduler state)
            self._fitted(self.max_iter, list(self.scheduler.milestones))
        states = ckpt.get("rng") or []
        if len(states) == self.env.world_size:
            set_rng_state(states[self.env.rank])
        else:
            logger.warning("%s was written by %d processes, this run has %d: RNG streams are reseeded, the "
                           "continuation is not bit-identical", path, len(states), self.env.world_size)
            torch.manual_seed(int(self.cfg["seed"]) + self.iteration + self.env.rank)
        if self.env.main:
            logger.info("resumed from %s at iteration %d", path, self.iteration)

    def save(self, final=False):
        rng = self.env.gather(rng_state())
        if not self.env.main:
            return None
        name = f"model_{self.iteration:07d}.pth"
        meta = {**self._schedule_meta(), "iteration": self.iteration, "preset": self.cfg["model"]["preset"]}
        save_checkpoint(
            self.out / name, self.model, self.model_cfg, meta=meta,
            optimizer=self.optimizer.state_dict(), scheduler=scheduler_state(self.scheduler),
            scaler=self.scaler.state_dict() if self.amp else None, iteration=self.iteration, rng=rng,
            train_config=self._public_config(),
        )
        tmp = self.out / ".last_checkpoint.tmp"
        tmp.write_text(name + "\n")
        os.replace(tmp, self.out / "last_checkpoint")
        keep = int(self.cfg["checkpoint"]["keep"] or 0)
        if keep > 0:
            for old in sorted(self.out.glob("model_[0-9]*.pth"))[:-keep]:
                old.unlink()
        return self.out / name

    def _schedule_meta(self):
        """The schedule the run validates with becomes the Refiner's default for every file it writes, so that a
        checkpoint judged mid-run is refined as the final model will be."""
        return {"scales": self.cfg["val"]["scales"], "auto_base": int(self.cfg["val"]["auto_base"])}

    def export(self):
        """Weights-only files for inference: model_final.pth (fp32) and, if asked, model_final_fp16.pth."""
        meta = {**self._schedule_meta(), "iteration": self.iteration, "trained_with": "crm-d2 train",
                "data": [str(s.get("root", s.get("type"))) for s in self.cfg["data"]["train"]]}
        paths = [save_checkpoint(self.out / "model_final.pth", self.model, self.model_cfg, meta=meta)]
        if self.cfg["checkpoint"]["export_half"]:
            paths.append(save_checkpoint(self.out / "model_final_fp16.pth", self.model, self.model_cfg, meta=meta,
                                         half=True))
        return paths

    # ------------------------------------------------------------------------------------------- data
    def _perturb(self, key="perturb"):
        d = self.cfg["data"].get(key)
        return PerturbConfig.from_dict(self.cfg["data"]["perturb"] if d is None else d)

    def train_loader(self):
        dcfg = self.cfg["data"]
        items = build_items(dcfg["train"], "train", self.cfg.get("_base_dir"), dcfg["empty"])
        dataset = CRMTrainDataset(items, dcfg["crop_size"], self._perturb(), seed=int(self.cfg["seed"]))
        sampler = StreamSampler(len(dataset), self.batch_per_rank, int(self.cfg["seed"]), self.env.rank,
                                self.env.world_size, start_iter=self.iteration)
        workers = int(dcfg["num_workers"])
        # A private generator: creating the loader must not consume the global torch RNG (resume exactness).
        gen = torch.Generator().manual_seed(int(self.cfg["seed"]))
        loader = DataLoader(dataset, batch_size=self.batch_per_rank, sampler=sampler, num_workers=workers,
                            pin_memory=self.device.type == "cuda", drop_last=True, generator=gen,
                            worker_init_fn=_worker_init if workers > 0 else None,
                            # Workers start from a clean forkserver, not a fork of this process: forking after
                            # OpenCV/OpenMP thread pools have run can leave a worker hung at its first call.
                            multiprocessing_context=_MP_CONTEXT if workers > 0 else None,
                            persistent_workers=False, prefetch_factor=4 if workers > 0 else None)
        return loader, len(items)

    # ------------------------------------------------------------------------------------------- loop
    def step(self, batch):
        image = batch["image"].to(self.device, non_blocking=True)
        gt = batch["gt"].to(self.device, non_blocking=True)
        coarse = batch["coarse"].to(self.device, non_blocking=True)
        net = self.ddp or self.model
        self.model.train()
        for m in self.frozen:
            m.eval()
        size = tuple(gt.shape[-2:])
        x = normalize_input(image, coarse)
        scales = self.cfg["data"]["input_scales"]
        s = scales[torch.randint(len(scales), (1,)).item()] if len(scales) > 1 else scales[0]
        x = resize(x, (round(size[0] * s), round(size[1] * s)))  # as the Refiner resizes a stage's input
        if self.cfg["solver"]["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        prior = coarse * 2 - 1 if self.model_cfg.mask_skip or self.model_cfg.pixel_head else None
        extra = {"image": normalize_image(image)} if self.model_cfg.pixel_head else {}
        samp = self.cfg["sampling"]
        sample = None
        if samp["points"]:
            band = boundary_band(gt, coarse, samp["band"]) if samp["boundary"] > 0 else None
            sample = draw_sample(len(gt), size, samp["tile"], samp["points"], device=self.device, band=band,
                                 boundary=samp["boundary"], reweight=samp["reweight"])
        with torch.autocast("cuda", dtype=torch.float16) if self.amp else nullcontext():
            out = net(x, out_size=size, prior=prior, sample=sample, **extra)
        if sample is None:
            loss, parts = self.criterion(out, gt)
        else:
            loss, parts = self.criterion.sampled(*out, gt, sample)
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss is {loss.item()} at iteration {self.iteration + 1}; lower solver.lr or "
                               "check the data")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg["solver"]["grad_clip"]:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(self.cfg["solver"]["grad_clip"]))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # the rate this iteration used
        self.scheduler.step()
        self.iteration += 1
        return loss.detach(), parts

    def train(self, stop_at=None):
        """Run to solver.max_iter (or stop after iteration `stop_at`, as a kill would after a checkpoint).

        Returns the last validation summary (or None)."""
        from tqdm import tqdm

        budget = self.cfg["solver"]["time_budget_s"]
        probe = (self.iteration + BUDGET_WARMUP_ITERS, self.iteration + BUDGET_WARMUP_ITERS + BUDGET_PROBE_ITERS)
        if budget:
            t_start = time.perf_counter()
            self.max_iter = max(self.max_iter, probe[1])  # fitted at the end of the probe
        last = lambda: self.max_iter if stop_at is None else min(self.max_iter, int(stop_at))  # noqa: E731
        end = last()
        if self.iteration >= self.max_iter:
            logger.info("already trained to iteration %d (solver.max_iter)", self.iteration)
            if self.env.main and not (self.out / "model_final.pth").exists():  # killed between its save and export
                for p in self.export():
                    logger.info("wrote %s", p)
            return None
        loader, n_items = self.train_loader()
        if self.env.main:
            logger.info("training %s on %d items, %d processes x %d crops of %s px, iterations %d -> %d, output %s",
                        self.model_cfg.to_dict(), n_items, self.env.world_size, self.batch_per_rank,
                        self.cfg["data"]["crop_size"], self.iteration, self.max_iter, self.out)
        ck_period = int(self.cfg["checkpoint"]["period"] or 0)
        val_period = int(self.cfg["val"]["period"] or 0)
        log_period = max(1, int(self.cfg["log"]["period"]))
        bar = tqdm(total=self.max_iter, initial=self.iteration, disable=not self.env.main, dynamic_ncols=True,
                   desc="train", file=sys.stderr)
        sums, count, t_data, t0 = {}, 0, 0.0, time.perf_counter()
        summary = None
        data_iter = iter(loader)
        try:
            while self.iteration < end:
                td = time.perf_counter()
                batch = next(data_iter)
                t_data += time.perf_counter() - td
                loss, parts = self.step(batch)
                if budget and self.iteration == probe[0]:
                    self._sync()
                    t_probe = time.perf_counter()
                elif budget and self.iteration == probe[1]:
                    self._fit_budget(budget, time.perf_counter() - t_start, t_probe)
                    end = last()
                    bar.total = self.max_iter
                    budget = None
                for k, v in [("loss", loss)] + list(parts.items()):
                    sums[k] = sums.get(k, 0.0) + v  # tensors: no device sync until the log line
                count += 1
                bar.update(1)
                it = self.iteration
                if it % log_period == 0 or it == end:
                    dt = time.perf_counter() - t0
                    keys = sorted(sums)
                    values = torch.stack([sums[k].float() for k in keys]) / count
                    if self.env.world_size > 1:  # the mean over all processes, as one would compute unsplit
                        dist.all_reduce(values)
                        values /= self.env.world_size
                    row = {"iter": it, **dict(zip(keys, values.tolist())),
                           "lr": self.last_lr, "time_per_iter": dt / count,
                           "data_time": t_data / count}
                    if self.env.main:
                        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
                        self.jsonl.write(row)
                        if self.tb:
                            for k, v in row.items():
                                if k != "iter":
                                    self.tb.add_scalar(f"train/{k}", v, it)
                    sums, count, t_data, t0 = {}, 0, 0.0, time.perf_counter()
                if ck_period and (it % ck_period == 0 or it == self.max_iter):
                    self.save()
                if it == self.max_iter and self.cfg["data"]["val"]:
                    summary = self.validate(full=True)
                elif val_period and it % val_period == 0:
                    summary = self.validate()
        finally:
            bar.close()
            del data_iter
        if self.iteration >= self.max_iter and self.env.main:
            for p in self.export():
                logger.info("wrote %s", p)
        self.env.barrier()
        return summary

    def _fit_budget(self, budget, elapsed, t_probe):
        """Fit max_iter and the steps to the time left, from the probe's speed (rank 0's, shared by all)."""
        sol = self.cfg["solver"]
        self._sync()
        rate = BUDGET_PROBE_ITERS / max(1e-9, time.perf_counter() - t_probe)
        max_iter, steps = fit_to_budget(self.iteration, rate, budget - elapsed, sol["max_iter"], sol["steps"])
        fitted = torch.tensor([max_iter, *steps])
        if self.env.world_size > 1:
            fitted = fitted.to(self.device)
            dist.broadcast(fitted, 0)
        max_iter, *steps = fitted.tolist()
        self._fitted(max_iter, steps)
        if self.env.main:
            logger.info("time budget %.0f s: %.2f iterations/s after %.0f s, so max_iter %d, steps %s",
                        budget, rate, elapsed, max_iter, steps)
            self._write_config()  # the fitted length: what a rerun of this exact run would say

    def _public_config(self):
        return {k: v for k, v in self.cfg.items() if not k.startswith("_")}  # "_base_dir" is this machine's

    def _write_config(self):
        text = yaml.safe_dump(self._public_config(), sort_keys=False)
        atomic_write(self.out / "config.yaml", lambda tmp: Path(tmp).write_text(text))

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _fitted(self, max_iter, steps):
        self.max_iter = max_iter
        self.cfg["solver"].update(max_iter=max_iter, steps=list(steps), time_budget_s=None)
        self.scheduler.milestones = Counter(steps)

    # ------------------------------------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self, full=False):
        """IoU / mBA (crm_d2.metrics) of coarse and refined masks on the held-out data, with the Refiner.

        Every validation, the final one (full=True) too, reads at most val.max_items items."""
        specs = self.cfg["data"]["val"]
        if not specs:
            return None
        summary = None
        if self.env.main:
            from tqdm import tqdm

            from crm_d2.metrics import RefinementMetrics
            from crm_d2.refiner import Refiner

            if self._refiner is None:
                # Built with a random init that must not advance the training RNG (resume exactness).
                with torch.random.fork_rng(devices=[]):
                    self._refiner = Refiner(None, device=self.device, scales=self.cfg["val"]["scales"],
                                            allow_random=True, config=self.model_cfg)
                    self._refiner.auto_base = int(self.cfg["val"]["auto_base"])
            self._refiner.model.load_state_dict(self.model.state_dict())
            self._refiner.model.eval()
            items = build_items(specs, "val", self.cfg.get("_base_dir"), "keep")
            cap = int(self.cfg["val"]["max_items"] or 0)
            if cap and len(items) > cap:  # evenly spread, so that every source is represented
                items = [items[i] for i in np.linspace(0, len(items) - 1, cap).round().astype(int)]
            metrics = RefinementMetrics()
            samples = val_samples(items, self._perturb("val_perturb"), seed=int(self.cfg["val"]["seed"]))
            for name, image, gt, coarse in tqdm(samples, total=len(items), desc="val", leave=False,
                                                file=sys.stderr, dynamic_ncols=True):
                try:
                    prob = self._refiner.refine(image, coarse, output="prob")
                except ValueError as exc:  # e.g. an image too small for CRM's padding
                    logger.warning("validation: skipping %s: %s", name, exc)
                    continue
                metrics.update(prob, gt, coarse, name=name)
            summary = metrics.summary()
            row = {"iter": self.iteration, "val/full": bool(full),
                   **{f"val/{k}": _finite(v) if k != "n" else v for k, v in summary.items()}}
            self.jsonl.write(row)
            if self.tb:
                for k in ("iou", "mba", "coarse_iou", "coarse_mba"):
                    if _finite(summary.get(k)) is not None:
                        self.tb.add_scalar(f"val/{k}", summary[k], self.iteration)
            logger.info("iter %d validation on %d images: IoU %.2f (coarse %.2f), mBA %.2f (coarse %.2f)",
                        self.iteration, summary["n"], summary["iou"], summary["coarse_iou"] or float("nan"),
                        summary["mba"], summary["coarse_mba"] or float("nan"))
        self.env.barrier()
        return summary


# ----------------------------------------------------------------------------------------------- CLI glue
def _setup_logging(main):
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO if main else logging.WARNING,
                            format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")


def train_from_args(args):
    """Entry point of `crm-d2 train` and tools/train_crm.py."""
    cfg = load_config(args.config, args.overrides)
    _setup_logging(world_from_env()[0] == 0)
    trainer = Trainer(cfg, output_dir=args.output, resume=args.resume, device=getattr(args, "device", None))
    try:
        trainer.train()
    finally:
        trainer.env.close()  # the process group, when this run set one up
    return 0
