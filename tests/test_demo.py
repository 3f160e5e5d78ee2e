"""`crm-d2 demo` on the shipped sample (shrunk, one image, a random tiny checkpoint) and its building blocks."""
import json

import numpy as np
import pytest
import torch

from crm_d2 import checkpoint, cli
from crm_d2.commands import demo
from crm_d2.model import CRM, CRMConfig
from crm_d2.panoptic.coco import PanopticSet, check_segments
from crm_d2.panoptic.pq import pq_image
from panoptic_reference import reference_per_class
from test_report import parse_page


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.manual_seed(0)
    cfg = CRMConfig.preset("tiny")
    checkpoint.save_checkpoint(path, CRM(cfg), cfg)
    return path


def test_sample_is_shipped_and_small():
    files = [p for p in demo.SAMPLE.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 2 << 20
    assert (demo.SAMPLE / "PROVENANCE.md").is_file()
    assert 4 <= len(list((demo.SAMPLE / "images").glob("*.jpg"))) <= 6


def test_sample_to_panoptic_and_simulated_coarse():
    items, cats = demo.load_sample(demo.SAMPLE, long_side=160, limit=2)
    assert len(items) == 2 and max(items[0][1].shape[:2]) == 160
    assert cats[1]["name"] == "background" and cats[1]["isthing"] == 0
    name, image, labels = items[0]
    gt, gt_segs = demo.labels_to_panoptic(labels, cats)
    check_segments(gt, gt_segs, categories=cats)
    assert {s["category_id"] for s in gt_segs} == {int(v) + 1 for v in np.unique(labels)}
    a = demo.simulate_coarse(gt, gt_segs, cats, factor=8, seed=3)
    b = demo.simulate_coarse(gt, gt_segs, cats, factor=8, seed=3)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]
    coarse, segs = a
    check_segments(coarse, segs, categories=cats)
    assert all(("score" in s) == bool(cats[s["category_id"]]["isthing"]) for s in segs)
    stats = pq_image(gt, gt_segs, coarse, segs, cats)
    iou, tp = sum(v[0] for v in stats.values()), sum(v[1] for v in stats.values())
    assert tp >= 2 and iou / tp < 0.97  # coarse: right segments, imperfect masks
    assert not (coarse == 0).any()  # a segmenter labels every pixel


def test_demo_runs_on_the_sample(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--weights", str(tiny_ckpt), "--device", "cpu", "-o", str(out), "--long-side", "96",
            "--limit", "1", "--scales", "0.5", "1.0", "--max-side", "64"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "without CRM" in text and "with CRM" in text and "Stuff" in text
    for f in ("gt.json", "coarse.json", "panoptic.json", "pq.json", "run.json"):
        assert (out / f).is_file(), f
    refined = PanopticSet(out / "panoptic.json", out / "panoptic")
    assert len(refined) == 1
    for ann in refined:
        refined.read_ids(ann)
    assert len(list((out / "overlays").glob("*.png"))) == 1 and not list((out / "overlays").glob("*.jpg"))
    pq = json.loads((out / "pq.json").read_text())
    assert set(pq) >= {"without_crm", "with_crm", "difference", "n_images", "per_category"}
    # per_category is panopticapi's per-class result recomputed from the written files
    cats = {c["id"]: c["name"] for c in json.loads((out / "gt.json").read_text())["categories"]}
    for side, pred in (("base", "coarse"), ("crm", "panoptic")):
        ref = reference_per_class(out / "gt.json", out / "gt", out / f"{pred}.json", out / pred)
        assert {cats[c] for c, r in ref.items() if r["pq"] or r["rq"]} <= set(pq["per_category"])
        for cid, r in ref.items():
            row = pq["per_category"].get(cats[cid], {}).get(side, {"pq": 0.0, "sq": 0.0, "rq": 0.0})
            assert [row[k] for k in ("pq", "sq", "rq")] == pytest.approx([r[k] for k in ("pq", "sq", "rq")])
    # the report, written by default in the output folder
    page = out / "report" / "index.html"
    parsed = parse_page(page)
    assert parsed.images and all((page.parent / src).is_file() for src in parsed.images)
    assert len(parsed.rows) == len(pq["per_category"])
    assert "that gained most PQ with CRM" in text
    assert cli.main(args + ["--json"]) == 0  # rerun: resumes, same numbers
    assert {k: v for k, v in json.loads(capsys.readouterr().out).items()} == pq


def test_demo_says_plainly_when_the_demo_model_is_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(checkpoint.NAMED_WEIGHTS, "demo", tmp_path / "absent.pth")
    assert cli.main(["demo", "-o", str(tmp_path / "o"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "the demo model is missing" in err and "--weights" in err
    assert not (tmp_path / "o").exists()  # nothing faked
