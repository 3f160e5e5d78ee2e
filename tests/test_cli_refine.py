import json

import cv2
import numpy as np
import pytest
import torch

from crm_d2.cli import main

from test_checkpoint import released_state_dict


@pytest.fixture
def big_dir(tmp_path, scene):
    """Two BIG-layout triplets (one with a shifted object)."""
    img, gt, coarse = scene
    d = tmp_path / "big"
    d.mkdir()
    for name, shift in (("a", 0), ("b", 9)):
        cv2.imwrite(str(d / f"{name}_im.jpg"), np.roll(img, shift, 1)[..., ::-1])
        cv2.imwrite(str(d / f"{name}_gt.png"), np.roll(gt, shift, 1).astype(np.uint8) * 255)
        cv2.imwrite(str(d / f"{name}_seg.png"), np.roll(coarse, shift, 1).astype(np.uint8) * 255)
    return d


@pytest.fixture
def released_weights(tmp_path, tiny_model):
    path = tmp_path / "model_45705"
    torch.save(released_state_dict(tiny_model), path)
    return path


def test_refine_big_folder_resume_and_eval(tmp_path, big_dir, released_weights, capsys):
    out = tmp_path / "out"
    args = ["refine", "--weights", str(released_weights), "--device", "cpu", "--big-dir", str(big_dir), "-o", str(out)]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]
    first = cv2.imread(str(out / "a.png"), cv2.IMREAD_UNCHANGED)
    assert first.shape == (90, 120) and first.dtype == np.uint8
    # an interrupted run resumes: existing outputs are skipped, missing ones are made
    (out / "b.png").unlink()
    capsys.readouterr()
    assert main(args) == 0
    assert "skipping 1 finished" in capsys.readouterr().out
    assert (out / "b.png").exists()
    assert not list(out.glob(".*"))  # no temporary files left behind

    assert main(["eval", "--big-dir", str(big_dir), "--pred-dir", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(res) == {"iou", "mba", "coarse_iou", "coarse_mba", "n"} and res["n"] == 2
    assert 0 <= res["iou"] <= 100 and 0 <= res["coarse_mba"] <= 100
    # the coarse numbers do not depend on the model
    assert res["coarse_iou"] > 80
    assert main(["eval", "--big-dir", str(big_dir), "--pred-dir", str(out)]) == 0
    table = capsys.readouterr().out
    assert "coarse" in table and "refined" in table and "mBA" in table


def test_refine_single_image(tmp_path, big_dir, released_weights):
    out = tmp_path / "single.png"
    assert main(["refine", "--weights", str(released_weights), str(big_dir / "a_im.jpg"), str(big_dir / "a_seg.png"),
                 "-o", str(out), "--binary", "--roi"]) == 0
    m = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    assert set(np.unique(m)) <= {0, 255}


def test_refine_fast_flag_selects_fast_mode(tmp_path, big_dir, released_weights, monkeypatch):
    from crm_d2 import refiner as refiner_module

    modes = []
    real = refiner_module.Refiner.__init__

    def spy(self, *a, **k):
        modes.append(k.get("mode"))
        real(self, *a, **k)

    monkeypatch.setattr(refiner_module.Refiner, "__init__", spy)
    for flag in ([], ["--fast"]):
        out = tmp_path / f"fast{len(flag)}.png"
        assert main(["refine", "--weights", str(released_weights), str(big_dir / "a_im.jpg"),
                     str(big_dir / "a_seg.png"), "-o", str(out)] + flag) == 0
        assert cv2.imread(str(out), cv2.IMREAD_UNCHANGED).shape == (90, 120)
    assert modes == ["exact", "fast"]


def test_cli_errors(tmp_path, big_dir, released_weights, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    rc = main(["refine", "--weights", str(released_weights), str(big_dir / "a_im.jpg"), str(bad), "-o", str(tmp_path / "x.png")])
    assert rc == 1 and "cannot decode mask" in capsys.readouterr().err
    rc = main(["refine", "--weights", str(tmp_path / "none.pth"), "--big-dir", str(big_dir), "-o", str(tmp_path / "o")])
    assert rc == 1 and "checkpoint not found" in capsys.readouterr().err
    rc = main(["eval", "--big-dir", str(big_dir), "--pred-dir", str(tmp_path / "empty")])
    assert rc == 1 and "prediction(s) missing" in capsys.readouterr().err
