import json

import cv2
import numpy as np
import pytest
import torch

from crm_d2.cli import main

from test_checkpoint import released_state_dict


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def big_dir(make_big_dir):
    """Two BIG-layout triplets (one with a shifted object)."""
    return make_big_dir({"a": 0, "b": 9})


@pytest.fixture
def released_weights(tmp_path, tiny_model):
    path = tmp_path / "model_45705"
    torch.save(released_state_dict(tiny_model), path)
    return path


def test_refine_big_folder_resume_and_eval(tmp_path, big_dir, released_weights, capsys):
    out = tmp_path / "out"
    args = ["refine", "--weights", str(released_weights), "--device", "cpu", "--big-dir", str(big_dir), "-o", str(out)]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "run.json"]
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


def refine_args(weights, *extra):
    return ["refine", "--weights", str(weights), "--device", "cpu", *extra]


def test_folder_rerun_with_other_settings_is_refused_until_overwrite(tmp_path, big_dir, released_weights, capsys):
    out = tmp_path / "out"
    # a mistyped --weights is not recorded as the folder's settings
    assert main(refine_args(tmp_path / "typo.pth", "--big-dir", str(big_dir), "-o", str(out))) == 1
    args = refine_args(released_weights, "--big-dir", str(big_dir), "-o", str(out))
    assert main(args) == 0
    assert json.loads((out / "run.json").read_text())["fast"] is False
    before = (out / "a.png").read_bytes()
    capsys.readouterr()
    # a changed rerun names what changed and keeps the old outputs as they are
    assert main(args + ["--fast"]) == 1
    err = capsys.readouterr().err
    assert "other settings" in err and "fast False -> True" in err and "--overwrite" in err
    assert main(args + ["--scales", "auto"]) == 1
    assert "scales None -> 'auto'" in capsys.readouterr().err
    assert (out / "a.png").read_bytes() == before
    # --overwrite redoes everything under the new settings, which are then the record
    assert main(args + ["--binary", "--overwrite"]) == 0
    assert set(np.unique(cv2.imread(str(out / "a.png"), cv2.IMREAD_UNCHANGED))) <= {0, 255}
    assert json.loads((out / "run.json").read_text())["binary"] is True
    assert main(args) == 1 and "binary True -> False" in capsys.readouterr().err
    assert main(args + ["--binary", "--device", "cpu", "--memory-budget-mb", "64"]) == 0  # not output settings
    # masks without a record (an older crm-d2, or other files) are not taken as finished either
    (out / "run.json").unlink()
    assert main(args) == 1 and "no record of their settings" in capsys.readouterr().err


def test_refine_accepts_auto_scales(tmp_path, big_dir, released_weights):
    out = tmp_path / "auto.png"
    assert main(refine_args(released_weights, str(big_dir / "a_im.jpg"), str(big_dir / "a_seg.png"), "-o", str(out),
                            "--scales", "auto")) == 0
    assert cv2.imread(str(out), cv2.IMREAD_UNCHANGED).shape == (90, 120)
    for bad in (["auto", "0.5"], ["half"]):
        with pytest.raises(SystemExit):
            main(refine_args(released_weights, "--big-dir", str(big_dir), "-o", str(tmp_path / "o"), "--scales", *bad))


def test_big_image_without_coarse_mask_is_reported(tmp_path, big_dir, released_weights, capsys):
    cv2.imwrite(str(big_dir / "c_im.jpg"), np.zeros((90, 120, 3), np.uint8))
    assert main(refine_args(released_weights, "--big-dir", str(big_dir), "-o", str(tmp_path / "out"))) == 0
    cap = capsys.readouterr()
    assert "skipped c_im.jpg: no coarse mask c_seg.png" in cap.err
    assert "wrote 2 mask(s)" in cap.out and "skipped 1 image(s) without a coarse mask" in cap.out
    assert main(["eval", "--big-dir", str(big_dir), "--pred-dir", str(tmp_path / "out"), "--json"]) == 0
    assert "skipped c_im.jpg: no coarse mask c_seg.png" in capsys.readouterr().err


def test_single_output_format_follows_its_extension(tmp_path, big_dir, released_weights, capsys):
    pair = [str(big_dir / "a_im.jpg"), str(big_dir / "a_seg.png")]
    for name in ("x.jpg", "x.JPEG", "x.webp", "x"):
        assert main(refine_args(released_weights, *pair, "-o", str(tmp_path / name))) == 1
        err = capsys.readouterr().err
        assert ("lossy" in err or "must end in .png" in err) and not (tmp_path / name).exists()
    magic = {"m.png": b"\x89PNG", "m.tif": (b"II*\x00", b"MM\x00*"), "m.bmp": b"BM"}
    for name, head in magic.items():
        assert main(refine_args(released_weights, *pair, "-o", str(tmp_path / name))) == 0
        assert (tmp_path / name).read_bytes().startswith(head)
    # a single output is always rewritten under the settings asked for (nothing to resume)
    assert main(refine_args(released_weights, *pair, "-o", str(tmp_path / "m.png"), "--binary")) == 0
    assert set(np.unique(cv2.imread(str(tmp_path / "m.png"), cv2.IMREAD_UNCHANGED))) <= {0, 255}


def test_colour_mask_is_refused_like_the_api(tmp_path, big_dir, released_weights, capsys):
    seg = cv2.imread(str(big_dir / "a_seg.png"), cv2.IMREAD_GRAYSCALE)
    colour = np.stack([seg, seg // 2, np.zeros_like(seg)], -1)
    cv2.imwrite(str(tmp_path / "colour.png"), colour)
    image = str(big_dir / "a_im.jpg")
    assert main(refine_args(released_weights, image, str(tmp_path / "colour.png"), "-o", str(tmp_path / "o.png"))) == 1
    assert "colour image" in capsys.readouterr().err and not (tmp_path / "o.png").exists()
    # a grey mask stored as RGB is the same mask
    cv2.imwrite(str(tmp_path / "grey3.png"), np.stack([seg] * 3, -1))
    assert main(refine_args(released_weights, image, str(tmp_path / "grey3.png"), "-o", str(tmp_path / "g.png"))) == 0
    assert main(refine_args(released_weights, image, str(big_dir / "a_seg.png"), "-o", str(tmp_path / "r.png"))) == 0
    assert (tmp_path / "g.png").read_bytes() == (tmp_path / "r.png").read_bytes()


def test_overlay_pictures(tmp_path, big_dir, released_weights, capsys):
    out, pics = tmp_path / "out", tmp_path / "pics"
    args = refine_args(released_weights, "--big-dir", str(big_dir), "-o", str(out))
    assert main(args + ["--overlay", str(pics)]) == 0
    assert "pictures (image | coarse | refined)" in capsys.readouterr().out
    assert sorted(p.name for p in pics.iterdir()) == ["a.png", "b.png"]
    assert (pics / "a.png").read_bytes().startswith(b"\x89PNG")
    pic = cv2.imread(str(pics / "a.png"))
    assert pic.shape == (90, 3 * 120 + 2 * 4, 3)
    image = cv2.imread(str(big_dir / "a_im.jpg"))
    assert np.abs(pic[40:, :120].astype(int) - image[40:]).max() == 0  # first panel: the image itself (below title)
    # finished outputs of an earlier run get their pictures without being refined again
    (pics / "b.png").unlink()
    assert main(args + ["--overlay", str(pics)]) == 0
    assert (pics / "b.png").exists()
    assert main(args + ["--overlay", str(out)]) == 1
    assert "other than -o" in capsys.readouterr().err
    single = tmp_path / "one.png"
    assert main(refine_args(released_weights, str(big_dir / "a_im.jpg"), str(big_dir / "a_seg.png"), "-o",
                            str(single), "--overlay", str(tmp_path / "p1"))) == 0
    assert (tmp_path / "p1" / "one.png").exists()


def test_folder_rerun_with_other_weights_under_the_same_name_is_refused(tmp_path, big_dir, released_weights, capsys):
    out = tmp_path / "out"
    args = refine_args(released_weights, "--big-dir", str(big_dir), "-o", str(out))
    assert main(args) == 0
    assert json.loads((out / "run.json").read_text())["weights_sha256"]
    assert main(args) == 0  # the same file: a resume
    capsys.readouterr()
    # new weights in the same file (a retrained model, or a newer shipped "demo") are another run
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in torch.load(released_weights).items()}
    torch.save(state, released_weights)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "weights_sha256" in err and "--overwrite" in err
