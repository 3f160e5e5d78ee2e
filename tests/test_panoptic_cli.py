"""`crm-d2 panoptic` and `crm-d2 instances` end to end on a tiny generated dataset: outputs, tables, resume, errors."""
import json

import cv2
import numpy as np
import pytest
import torch

from crm_d2 import cli
from crm_d2.checkpoint import save_checkpoint
from crm_d2.commands import panoptic as panoptic_cmd
from crm_d2.io import write_png
from crm_d2.model import CRM, CRMConfig
from crm_d2.panoptic.coco import PanopticSet, id2rgb, write_panoptic_image, write_panoptic_json
from crm_d2.panoptic.instances_eval import encode_results
from crm_d2.panoptic.pq import pq_compute

CATEGORIES = [{"id": 1, "name": "sky", "isthing": 0}, {"id": 2, "name": "ground", "isthing": 0},
              {"id": 3, "name": "box", "isthing": 1}, {"id": 4, "name": "ball", "isthing": 1}]
H, W = 48, 64
FAST = ["--scales", "0.5", "1.0", "--max-side", "64", "--min-area", "16"]


def make_gt(rng):
    ids = np.zeros((H, W), np.uint32)
    ids[: H // 2] = 1
    ids[H // 2:] = 2
    y, x = rng.integers(6, 16), rng.integers(4, 20)
    ids[y:y + 16, x:x + 18] = 3
    yy, xx = np.mgrid[:H, :W]
    ids[(yy - 32) ** 2 + (xx - 46) ** 2 < 9 ** 2] = 4
    ids[:2, :] = 0  # a void strip
    segs = [{"id": i, "category_id": i, "iscrowd": 0} for i in (1, 2, 3, 4)]
    return ids, segs


def make_coarse(rng, gt):
    """Blocky prediction of a 1/8-resolution segmenter, shifted by a pixel or two, with other segment ids."""
    small = gt[4::8, 4::8]
    up = cv2.resize(small.astype(np.float32), (W, H), interpolation=cv2.INTER_NEAREST).astype(np.uint32)
    up = np.roll(up, (int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), axis=(0, 1))
    ids = np.where(up > 0, up + 10, 0).astype(np.uint32)
    segs = [{"id": int(i), "category_id": int(i) - 10} for i in np.unique(ids) if i]
    for s in segs:
        if s["category_id"] >= 3:
            s["score"] = 0.9 if s["category_id"] == 3 else 0.7
    return ids, segs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("pan")
    rng = np.random.default_rng(0)
    colours = {0: (90, 90, 90), 1: (120, 170, 240), 2: (90, 140, 60), 3: (200, 60, 40), 4: (240, 220, 40)}
    gt_anns, pred_anns, images = [], [], []
    for k in range(1, 4):
        gt, gt_segs = make_gt(rng)
        image = np.zeros((H, W, 3), np.uint8)
        for v, c in colours.items():
            image[gt == v] = c
        image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
        write_png(root / "images" / f"im{k}.png", image)
        images.append({"id": k, "file_name": f"im{k}.png", "height": H, "width": W})
        gt_anns.append(write_panoptic_image(root / "gt", f"im{k}.png", k, gt, gt_segs, sidecar=False))
        pred, pred_segs = make_coarse(rng, gt)
        pred_anns.append(write_panoptic_image(root / "pred", f"im{k}.png", k, pred, pred_segs, sidecar=False))
    write_panoptic_json(root / "gt.json", gt_anns, CATEGORIES, images=images)
    write_panoptic_json(root / "pred.json", pred_anns, CATEGORIES, images=images)
    torch.manual_seed(0)
    cfg = CRMConfig.preset("tiny")
    save_checkpoint(root / "tiny.pth", CRM(cfg), cfg)
    return root


def pan_args(d, out, *extra):
    return ["panoptic", "--images", str(d / "images"), "--pred-json", str(d / "pred.json"), "--pred-dir",
            str(d / "pred"), "--gt-json", str(d / "gt.json"), "--gt-dir", str(d / "gt"), "--weights",
            str(d / "tiny.pth"), "--device", "cpu", "-o", str(out), *FAST, *extra]


def test_panoptic_end_to_end_and_resume(dataset, tmp_path, capsys, monkeypatch):
    d = dataset
    assert cli.main(pan_args(d, tmp_path / "full", "--json")) == 0
    full = json.loads(capsys.readouterr().out)
    base = pq_compute(d / "gt.json", d / "gt", d / "pred.json", d / "pred")
    for g in ("all", "things", "stuff"):
        assert full["without_crm"][g]["pq"] == pytest.approx(base[g]["pq"])
        assert full["difference"][g]["pq"] == pytest.approx(full["with_crm"][g]["pq"] - base[g]["pq"])
    assert full["n_images"] == 3
    refined = PanopticSet(tmp_path / "full" / "panoptic.json", tmp_path / "full" / "panoptic")
    assert sorted(refined.annotations) == [1, 2, 3]
    coarse = PanopticSet(d / "pred.json", d / "pred")
    changed = 0
    for ann in refined:
        ids = refined.read_ids(ann)  # PNG and JSON agree (raises otherwise)
        changed += int(np.count_nonzero(ids != coarse.read_ids(coarse.annotations[ann["image_id"]])))
    assert changed > 0  # the refiner's output reached the written maps
    assert json.loads((tmp_path / "full" / "pq.json").read_text()) == full

    # A run killed after the first image, then resumed: same final numbers, finished images not redone.
    real = panoptic_cmd.refine_panoptic
    calls = []

    def dies_on_second(*a, **k):
        calls.append(k["where"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(panoptic_cmd, "refine_panoptic", dies_on_second)
    assert cli.main(pan_args(d, tmp_path / "resumed", "--json")) == 130
    assert (tmp_path / "resumed" / "panoptic" / "im1.segments.json").is_file()
    assert not (tmp_path / "resumed" / "panoptic" / "im2.png").exists()
    assert not (tmp_path / "resumed" / "panoptic.json").exists()
    capsys.readouterr()
    calls.clear()
    monkeypatch.setattr(panoptic_cmd, "refine_panoptic", lambda *a, **k: calls.append(k["where"]) or real(*a, **k))
    assert cli.main(pan_args(d, tmp_path / "resumed", "--json")) == 0
    assert len(calls) == 2  # images 2 and 3 only
    assert json.loads(capsys.readouterr().out) == full

    # The table, and a rerun with other settings refused.
    assert cli.main(pan_args(d, tmp_path / "full")) == 0
    out = capsys.readouterr().out
    assert "without CRM" in out and "with CRM" in out and "Things" in out and "Stuff" in out
    assert cli.main(pan_args(d, tmp_path / "full", "--merge", "prob")) == 1
    assert "other settings (options differ" in capsys.readouterr().err


def write_pred(d, tmp_path, mutate):
    """Copy of the prediction with `mutate(ids, segs, k)` applied per image; returns (json, dir)."""
    pred = PanopticSet(d / "pred.json", d / "pred")
    anns = []
    for ann in pred:
        ids, segs = mutate(pred.read_ids(ann), [dict(s) for s in ann["segments_info"]], ann["image_id"])
        anns.append({"image_id": ann["image_id"], "file_name": ann["file_name"], "segments_info": segs})
        write_png(tmp_path / "bad" / ann["file_name"], id2rgb(ids))
    write_panoptic_json(tmp_path / "bad.json", anns, CATEGORIES)
    return tmp_path / "bad.json", tmp_path / "bad"


def run_bad(d, tmp_path, capsys, pred_json, pred_dir, images=None):
    out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
    args = pan_args(d, out)
    args[args.index("--pred-json") + 1] = str(pred_json)
    args[args.index("--pred-dir") + 1] = str(pred_dir)
    if images:
        args[args.index("--images") + 1] = str(images)
    assert cli.main(args) == 1
    return capsys.readouterr().err


def test_panoptic_bad_input(dataset, tmp_path, capsys):
    d = dataset

    def unknown_image(ids, segs, k):
        return ids, segs

    pj, pd = write_pred(d, tmp_path, unknown_image)
    data = json.loads(pj.read_text())
    data["annotations"][1]["image_id"] = 99
    pj.write_text(json.dumps(data))
    err = run_bad(d, tmp_path, capsys, pj, pd)
    assert "im2.png has image_id 99, which is not in the ground truth" in err

    def drop_json_id(ids, segs, k):
        return ids, segs[1:] if k == 2 else segs

    pj, pd = write_pred(d, tmp_path, drop_json_id)
    err = run_bad(d, tmp_path, capsys, pj, pd)
    assert "in the PNG are not in the JSON" in err and "im2.png (image_id 2)" in err

    def unknown_category(ids, segs, k):
        segs[0]["category_id"] = 77
        return ids, segs

    pj, pd = write_pred(d, tmp_path, unknown_category)
    err = run_bad(d, tmp_path, capsys, pj, pd)
    assert "unknown category_id 77" in err

    small = tmp_path / "small_images"
    for k in (1, 2, 3):
        img = cv2.imread(str(d / "images" / f"im{k}.png"))
        small.mkdir(exist_ok=True)
        cv2.imwrite(str(small / f"im{k}.png"), img[:40])
    err = run_bad(d, tmp_path, capsys, d / "pred.json", d / "pred", images=small)
    assert "im1.png is 64x40 but its panoptic PNG" in err and "is 64x48" in err

    (tmp_path / "empty.json").write_text(json.dumps({"annotations": [], "categories": CATEGORIES}))
    err = run_bad(d, tmp_path, capsys, tmp_path / "empty.json", d / "pred")
    assert "has no annotations" in err


def instance_files(d, tmp_path, overlap=False):
    """COCO instances GT (things of the panoptic GT) and results (coarse things) for the tiny dataset."""
    gt = PanopticSet(d / "gt.json", d / "gt")
    pred = PanopticSet(d / "pred.json", d / "pred")
    images, anns, results = [], [], []
    for image_id, ann in gt.annotations.items():
        images.append({"id": image_id, "file_name": f"im{image_id}.png", "height": H, "width": W})
        ids = gt.read_ids(ann)
        for s in ann["segments_info"]:
            if s["category_id"] >= 3:
                r = encode_results(image_id, (ids == s["id"])[None], [1.0], s["category_id"])[0]
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": s["category_id"],
                             "segmentation": r["segmentation"], "area": int((ids == s["id"]).sum()),
                             "bbox": s["bbox"], "iscrowd": 0})
        p = pred.read_ids(pred.annotations[image_id])
        for s in pred.annotations[image_id]["segments_info"]:
            if s["category_id"] >= 3:
                m = p == s["id"]
                results += encode_results(image_id, m[None], [s["score"]], s["category_id"])
                if overlap:  # a second detection of the same thing, shifted by 3 px
                    results += encode_results(image_id, np.roll(m, 3, axis=1)[None], [0.5], s["category_id"])
    gt_path = tmp_path / "inst_gt.json"
    gt_path.write_text(json.dumps({"images": images, "annotations": anns,
                                   "categories": [c for c in CATEGORIES if c["isthing"]]}))
    res_path = tmp_path / ("res_overlap.json" if overlap else "res.json")
    res_path.write_text(json.dumps(results))
    return gt_path, res_path


def inst_args(d, gt, res, out, *extra):
    return ["instances", "--images", str(d / "images"), "--pred-json", str(res), "--gt-json", str(gt),
            "--weights", str(d / "tiny.pth"), "--device", "cpu", "-o", str(out), *FAST, *extra]


def test_instances_end_to_end(dataset, tmp_path, capsys):
    d = dataset
    gt, res = instance_files(d, tmp_path)
    assert cli.main(inst_args(d, gt, res, tmp_path / "o1", "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["without_crm"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert out["without_crm"]["AP"] >= 0 and out["n_images"] == 3
    refined = json.loads((tmp_path / "o1" / "results.json").read_text())
    assert refined and all(r["segmentation"]["size"] == [H, W] for r in refined)
    assert sorted(p.name for p in (tmp_path / "o1" / "parts").iterdir()) == ["1.json", "2.json", "3.json"]
    # rerun: everything is done already, same numbers
    assert cli.main(inst_args(d, gt, res, tmp_path / "o1", "--json")) == 0
    assert json.loads(capsys.readouterr().out) == out

    # the same masks as uncompressed RLE give the same numbers; polygons are read too
    from pycocotools import mask as mask_utils

    loose, polygons = json.loads(res.read_text()), json.loads(res.read_text())
    for r, q in zip(loose, polygons):
        m = mask_utils.decode(dict(r["segmentation"], counts=r["segmentation"]["counts"].encode()))
        flat = m.ravel(order="F")
        runs = np.diff(np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])).tolist()
        r["segmentation"] = {"size": [H, W], "counts": ([0] if flat[0] else []) + runs}
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        q["segmentation"] = [c.ravel().astype(float).tolist() for c in contours if len(c) >= 3]
    (tmp_path / "loose.json").write_text(json.dumps(loose))
    assert cli.main(inst_args(d, gt, tmp_path / "loose.json", tmp_path / "o6", "--json")) == 0
    assert json.loads(capsys.readouterr().out) == out
    (tmp_path / "polygons.json").write_text(json.dumps(polygons))
    assert cli.main(inst_args(d, gt, tmp_path / "polygons.json", tmp_path / "o7", "--json")) == 0
    assert json.loads(capsys.readouterr().out)["without_crm"]["AP"] >= 0

    # entity AP against the panoptic GT, masks refined as non-overlapping entities; the table
    assert cli.main(inst_args(d, d / "gt.json", res, tmp_path / "o2", "--gt-dir", str(d / "gt"),
                              "--non-overlapping")) == 0
    text = capsys.readouterr().out
    assert "entity (class-agnostic) mask AP" in text and "with CRM - without CRM" in text

    _, bad = instance_files(d, tmp_path, overlap=True)
    assert cli.main(inst_args(d, gt, bad, tmp_path / "o3", "--non-overlapping")) == 1
    err = capsys.readouterr().err
    assert "masks #0 and #1 of the instance list" in err and "(image_id 1)" in err

    (tmp_path / "empty.json").write_text("[]")
    assert cli.main(inst_args(d, gt, tmp_path / "empty.json", tmp_path / "o4")) == 1
    assert "empty prediction list" in capsys.readouterr().err
    stray = json.loads(res.read_text())
    stray[0]["image_id"] = 42
    (tmp_path / "stray.json").write_text(json.dumps(stray))
    assert cli.main(inst_args(d, gt, tmp_path / "stray.json", tmp_path / "o5")) == 1
    assert "result 0 is for image_id 42, which is not in the GT" in capsys.readouterr().err


def _page_files(report_dir):
    """Images the report page references (all must exist) and its per-category rows."""
    from test_report import parse_page

    parsed = parse_page(report_dir / "index.html")
    assert parsed.images and all((report_dir / src).is_file() for src in parsed.images)
    return parsed


def test_panoptic_per_category_and_report(dataset, tmp_path, capsys):
    from panoptic_reference import reference_per_class

    d = dataset
    out, rep = tmp_path / "run", tmp_path / "rep"
    assert cli.main(pan_args(d, out, "--report", str(rep))) == 0
    captured = capsys.readouterr()
    assert "that gained most PQ with CRM:" in captured.out and "that lost most PQ with CRM:" in captured.out
    assert f"report: {rep / 'index.html'}" in captured.err
    saved = json.loads((out / "pq.json").read_text())
    names = {c["id"]: c["name"] for c in CATEGORIES}
    for side, (pj, pd) in (("base", (d / "pred.json", d / "pred")),
                           ("crm", (out / "panoptic.json", out / "panoptic"))):
        for cid, r in reference_per_class(d / "gt.json", d / "gt", pj, pd).items():
            for k in ("pq", "sq", "rq"):
                assert saved["per_category"][names[cid]][side][k] == pytest.approx(r[k], abs=1e-9)
    parsed = _page_files(rep)
    assert len(parsed.rows) == len(saved["per_category"]) == 4
    assert 0 < len(parsed.images) <= 24

    # --json carries the same per_category; a rerun replaces its own report
    assert cli.main(pan_args(d, out, "--report", str(rep), "--json")) == 0
    assert json.loads(capsys.readouterr().out)["per_category"] == saved["per_category"]
    # another run's report is refused before any refinement, then replaced with --overwrite
    assert cli.main(pan_args(d, tmp_path / "run2", "--report", str(rep))) == 1
    err = capsys.readouterr().err
    assert "holds the report of another run" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run2" / "panoptic.json").exists()
    assert cli.main(pan_args(d, tmp_path / "run2", "--report", str(rep), "--overwrite", "--band", "0.1")) == 0
    assert json.loads((rep / "report.json").read_text())["source"]["output"] == str((tmp_path / "run2").resolve())
    _page_files(rep)
    # a report needs the GT
    args = pan_args(d, tmp_path / "run3", "--report", str(tmp_path / "rep3"))
    del args[args.index("--gt-json"):args.index("--gt-json") + 4]
    assert cli.main(args) == 1
    assert "--report needs --gt-json and --gt-dir" in capsys.readouterr().err


def test_instances_per_category_and_report(dataset, tmp_path, capsys):
    d = dataset
    gt, res = instance_files(d, tmp_path)
    rep = tmp_path / "rep"
    assert cli.main(inst_args(d, gt, res, tmp_path / "o1", "--json", "--report", str(rep))) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["per_category"]) == {"box", "ball"}
    for name in ("box", "ball"):
        assert set(out["per_category"][name]["base"]) == {"AP", "AP50", "AP75"}
    assert np.mean([r["base"]["AP"] for r in out["per_category"].values()]) == pytest.approx(out["without_crm"]["AP"])
    assert np.mean([r["crm"]["AP"] for r in out["per_category"].values()]) == pytest.approx(out["with_crm"]["AP"])
    parsed = _page_files(rep)
    assert len(parsed.rows) == 2
    record = json.loads((rep / "report.json").read_text())
    assert record["gallery"] and all("iou_base" in e for e in record["gallery"])  # every detection has its GT

    # entity AP: one row per object size, and the table text
    assert cli.main(inst_args(d, d / "gt.json", res, tmp_path / "o2", "--gt-dir", str(d / "gt"),
                              "--non-overlapping", "--report", str(tmp_path / "rep2"))) == 0
    text = capsys.readouterr().out
    assert "that gained most AP with CRM:" in text and "that lost most AP with CRM:" in text
    ap = json.loads((tmp_path / "o2" / "ap.json").read_text())
    assert list(ap["per_category"]) == ["small", "medium", "large"]
    assert ap["per_category"]["small"]["base"]["AP"] == pytest.approx(ap["without_crm"]["APs"], nan_ok=True)
    assert len(_page_files(tmp_path / "rep2").rows) == 3
