"""torchrun: `panoptic`, `instances` and `refine --big-dir` on two CPU processes (gloo), through the real entry point,
give byte for byte what one process gives, each rank doing its share; a run resumed with another number of
processes finishes the rest; a refusal on rank 0 stops every rank with the same one-line error."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch.distributed as dist

from crm_d2.distributed import DistEnv, session, world_from_env
from test_panoptic_cli import dataset, inst_args, instance_files, pan_args  # noqa: F401 (dataset is a fixture)

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GROUP_RANK", "TORCHELASTIC_RUN_ID")


def launch(args, nproc=1):
    """`crm-d2 ARGS` in a subprocess: plain `python -m crm_d2.cli` (nproc 1), else torchrun with nproc processes
    (--standalone: a free port of its own, so parallel test runs do not clash)."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    head = [sys.executable]
    if nproc > 1:
        head += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    proc = subprocess.run([*head, "-m", "crm_d2.cli", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    return proc


def ok(proc):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def files(folder):
    """{relative path: bytes} of every file under folder."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def stamps(folder):
    return {p: p.stat().st_mtime_ns for p in Path(folder).rglob("*") if p.is_file()}


def copy_some(src, dst, names):
    """A run that stopped early: run.json and the finished outputs `names` of src."""
    for name in ["run.json", *names]:
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / name, dst / name)


# ----------------------------------------------------------------------------------------------- the helpers
def test_plain_run_sets_nothing_up(monkeypatch):
    for k in TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)
    assert world_from_env() == (0, 1, 0)
    with session("cpu") as env:
        assert (env.rank, env.world_size, env.main, env.distributed) == (0, 1, True, False)
        assert env.device == "cpu" and not dist.is_initialized()  # the device stays as given
        assert env.shard([3, 1, 2]) == [3, 1, 2] and env.gather("x") == ["x"]
        assert env.decide(lambda a, b: a + b, 1, b=2) == 3
        env.barrier()
    with session(None) as env:
        assert env.device is None  # the Refiner's own choice, as before


def test_shard_is_rank_strided():
    items = list(range(7))
    shares = [DistEnv(rank=r, world_size=3).shard(items) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(shares, [])) == items


def test_decide_in_one_process_raises_as_is():
    with pytest.raises(ValueError, match="refused"):
        DistEnv().decide(lambda: (_ for _ in ()).throw(ValueError("refused")))


# ----------------------------------------------------------------------------------------------- the commands
def test_panoptic_two_processes_equal_one(dataset, tmp_path):
    d = dataset
    one = ok(launch(pan_args(d, tmp_path / "one", "--json")))
    two = ok(launch(pan_args(d, tmp_path / "two", "--json"), nproc=2))
    assert json.loads(one.stdout)["n_images"] == 3
    assert two.stdout == one.stdout  # PQ printed once (rank 0), the same numbers
    assert files(tmp_path / "two") == files(tmp_path / "one")  # PNGs, sidecars, panoptic.json, pq.json, run.json
    # Rank 0's bar counts its share (2 of 3 images); rank 1 (1 image) shows none.
    assert "3/3" in one.stderr and "2/2" in two.stderr and "1/1" not in two.stderr

    # Rerun with 2 processes: nothing is redone.
    before = stamps(tmp_path / "two" / "panoptic")
    again = ok(launch(pan_args(d, tmp_path / "two", "--json"), nproc=2))
    assert again.stdout == one.stdout and stamps(tmp_path / "two" / "panoptic") == before

    # A one-process run stopped after the first image, finished by two processes: the one-process result.
    res = tmp_path / "resumed"
    copy_some(tmp_path / "one", res, ["panoptic/im1.png", "panoptic/im1.segments.json"])
    resumed = ok(launch(pan_args(d, res, "--json"), nproc=2))
    assert resumed.stdout == one.stdout and files(res) == files(tmp_path / "one")
    assert "1/1" in resumed.stderr  # the 2 images left, one each


def test_instances_two_processes_equal_one_and_refusal(dataset, tmp_path):
    d = dataset
    gt, res = instance_files(d, tmp_path)
    one = ok(launch(inst_args(d, gt, res, tmp_path / "one", "--json")))
    assert json.loads(one.stdout)["n_images"] == 3
    # A one-process run stopped after the first image, finished by two processes.
    copy_some(tmp_path / "one", tmp_path / "two", ["parts/1.json"])
    two = ok(launch(inst_args(d, gt, res, tmp_path / "two", "--json"), nproc=2))
    assert two.stdout == one.stdout  # AP printed once, the same numbers
    assert files(tmp_path / "two") == files(tmp_path / "one")  # parts, results.json, ap.json, run.json
    assert sorted(p.name for p in (tmp_path / "two" / "parts").iterdir()) == ["1.json", "2.json", "3.json"]
    assert "1/1" in two.stderr and "2/2" not in two.stderr

    # Other settings: rank 0 refuses, every rank stops (no hang), and the one line is printed once.
    refused = launch(inst_args(d, gt, res, tmp_path / "two", "--score-thresh", "0.8"), nproc=2)
    assert refused.returncode != 0
    text = refused.stdout + refused.stderr
    assert text.count("crm-d2 instances: error:") == 1
    assert text.count(f"{tmp_path / 'two'} holds a run with other settings (score_thresh differ") == 1
    assert files(tmp_path / "two") == files(tmp_path / "one")  # nothing touched


@pytest.fixture
def big_dir(make_big_dir):
    """Three BIG-layout triplets (the object shifted)."""
    return make_big_dir({"a": 0, "b": 9, "c": -7})


def test_refine_big_dir_two_processes_equal_one(big_dir, tmp_path):
    def args(out):
        return ["refine", "--big-dir", big_dir, "-o", out, "--device", "cpu", "--roi", "--max-side", "64"]

    one = ok(launch(args(tmp_path / "one")))
    assert sorted(files(tmp_path / "one")) == ["a.png", "b.png", "c.png", "run.json"]
    two = ok(launch(args(tmp_path / "two"), nproc=2))
    assert two.stdout == f"wrote 3 mask(s) to {tmp_path / 'two'}\n"  # the summary, printed once
    assert files(tmp_path / "two") == files(tmp_path / "one")
    assert "2/2" in two.stderr and "3/3" in one.stderr

    copy_some(tmp_path / "one", tmp_path / "resumed", ["b.png"])
    resumed = ok(launch(args(tmp_path / "resumed"), nproc=2))
    assert resumed.stdout.splitlines() == ["skipping 1 finished outputs (use --overwrite to redo them)",
                                           f"wrote 2 mask(s) to {tmp_path / 'resumed'}, kept 1 finished"]
    assert files(tmp_path / "resumed") == files(tmp_path / "one")

    # A bad input in rank 1's share (b): rank 1 stops with its one-line error, torchrun ends rank 0 (no hang).
    cv2.imwrite(str(big_dir / "b_seg.png"), np.zeros((20, 20), np.uint8))
    bad = launch(args(tmp_path / "bad"), nproc=2)
    assert bad.returncode != 0
    assert f"crm-d2 refine: error: {big_dir / 'b_seg.png'} is 20x20 but {big_dir / 'b_im.jpg'} is 120x90" in bad.stderr
    # Rank 0, if torchrun has not stopped it first, names what happened rather than the backend's error.
    assert bad.stderr.count("crm-d2 refine: error:") == 1 + bad.stderr.count("another process of this run stopped")


def test_plain_cuda_device_gets_the_current_index(monkeypatch):
    """`--device cuda` in a single process: torch.cuda.set_device refuses a device without an index (torch 2.11,
    seen on an H200: every CUDA training run failed), so it becomes cuda:<current device>."""
    import torch

    from crm_d2.distributed import _local_device

    def set_device(dev):
        if isinstance(dev, torch.device) and dev.index is None:
            raise ValueError("Expected a torch.device with a specified index or an integer, but got:cuda")
        calls.append(dev)

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    assert _local_device("cuda", 1, 0) == torch.device("cuda", 3) == calls[-1]
    assert _local_device(None, 1, 0) == torch.device("cuda", 3)
    assert _local_device("cuda:1", 1, 0) == torch.device("cuda", 1)
    assert _local_device("cuda", 4, 2) == torch.device("cuda", 2)  # torchrun: the rank's own GPU
