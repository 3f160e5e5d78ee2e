"""What a resumable training run keeps besides the weights and the optimizer: every RNG's state, the scheduler's
state in a form `torch.load(weights_only=True)` accepts, and a metrics log that a resume cuts back to its
iteration (the trainer's resume contract: `crm_d2.train.trainer`)."""
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import torch

__all__ = ["rng_state", "set_rng_state", "scheduler_state", "load_scheduler_state", "MetricsLog"]


def rng_state():
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def scheduler_state(sched):
    s = sched.state_dict()
    s["milestones"] = dict(s["milestones"])  # Counter is not in torch.load's weights_only allow-list
    return s


def load_scheduler_state(sched, s):
    s = dict(s)
    s["milestones"] = Counter(s["milestones"])
    sched.load_state_dict(s)


class MetricsLog:
    """metrics.jsonl: one JSON object per line; on resume, rows past the resumed iteration are dropped."""

    def __init__(self, path, resume_iter=None):
        self.path = Path(path)
        if resume_iter is not None and self.path.exists():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("iter", 0) <= resume_iter:
                        keep.append(line)
                except json.JSONDecodeError:
                    pass  # a line cut by the kill
            self.path.write_text("".join(line + "\n" for line in keep))
        elif resume_iter is None and self.path.exists():
            self.path.unlink()

    def write(self, row):
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
