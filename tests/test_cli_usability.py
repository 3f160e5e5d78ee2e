"""What a new user trips over (issue 13): help, version, messages, pictures, optional detectron2, --scales auto."""
import argparse
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from crm_d2 import __version__, cli
from crm_d2.commands.panoptic import options_from_args
from crm_d2.panoptic.refine import SegmentRefineOptions, refine_segment_probs
from crm_d2.pictures import side_by_side

REPO = Path(__file__).resolve().parents[1]


def crm(*args):
    """The real entry point, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "crm_d2.cli", *args], capture_output=True, text=True, cwd=REPO)


def test_version_and_refine_help():
    assert crm("--version").stdout.strip() == f"crm-d2 {__version__}"
    text = crm("refine", "--help").stdout
    usage = text.split("\n\n")[0]
    assert "IMAGE MASK -o OUT.png" in usage and "--big-dir DIR -o OUTDIR" in usage and "..." not in usage
    flat = " ".join(text.split())
    assert "(default: demo)" in flat and "the authors' released file" in flat  # --weights
    assert "soft" in flat and "--binary" in flat and "0/255" in flat
    assert "(default: 512)" in flat and "list of scales, or 'auto' (default: the model's own schedule)" in flat


def test_instances_help_offers_only_what_applies(capsys):
    with pytest.raises(SystemExit):
        cli.main(["instances", "--help"])
    flat = " ".join(capsys.readouterr().out.split())
    assert "--targets" not in flat and "prob-void" not in flat and "--merge {hybrid," in flat
    assert "with --non-overlapping only" in flat and "paste: the higher score wins" in flat
    with pytest.raises(SystemExit):
        cli.main(["panoptic", "--help"])
    flat = " ".join(capsys.readouterr().out.split())
    assert "--targets {things,stuff,both}" in flat and "prob: the higher probability" in flat


def test_scales_auto_reaches_every_refining_command():
    parser = cli.build_parser()
    base = ["--images", "i", "--pred-json", "p.json", "--weights", "w", "-o", "o"]
    for argv in (["panoptic", *base, "--pred-dir", "d"], ["instances", *base, "--gt-json", "g.json"], ["demo"]):
        args = parser.parse_args(argv + ["--scales", "auto"])
        assert args.scales == "auto" and options_from_args(args).scales == "auto"
        assert parser.parse_args(argv + ["--scales", "0.5", "1"]).scales == [0.5, 1.0]

    class Spy:
        def refine_batch(self, image, masks, **kw):
            self.kw = kw
            return np.zeros(masks.shape, np.float32)

    spy = Spy()
    refine_segment_probs(spy, np.zeros((40, 40, 3), np.uint8), [np.ones((40, 40), bool)],
                         SegmentRefineOptions(scales="auto"))
    assert spy.kw["scales"] == "auto"


def test_benchmark_passes_auto_scales_to_its_children(monkeypatch):
    spec = importlib.util.spec_from_file_location("benchmark", REPO / "tools" / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    seen = []
    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kw: seen.append(cmd) or
                        argparse.Namespace(stdout='RESULT {"ok": 1}', stderr=""))
    cfg = dict(size="1k", mode="exact", device="cpu", weights="demo", runs=1, seed=0, budget_mb=64, scales="auto")
    assert bench.child(cfg) == {"ok": 1}
    assert seen[0][seen[0].index("--scales"):] == ["--scales", "auto"]
    # the coarse masks' factor and the thread count reach the child, which times one configuration
    bench.child(dict(cfg, coarse_factor=8.0, threads=2))
    assert seen[1][seen[1].index("--coarse-factor"):][:2] == ["--coarse-factor", "8.0"]
    assert seen[1][seen[1].index("--threads"):][:2] == ["--threads", "2"]


def test_api_says_when_imread_failed():
    from crm_d2.refiner import Refiner

    refiner = Refiner(None, allow_random=True, config="tiny", device="cpu")
    image, mask = np.zeros((48, 48, 3), np.uint8), np.zeros((48, 48), np.uint8)
    with pytest.raises(ValueError, match=r"image is None \(did cv2.imread fail\?\)"):
        refiner.refine(None, mask)
    with pytest.raises(ValueError, match=r"mask is None \(did cv2.imread fail\?\)"):
        refiner.refine(image, None)
    with pytest.raises(ValueError, match="it has channels"):  # what the CLI's colour-mask refusal agrees with
        refiner.refine(image, np.zeros((48, 48, 3), np.uint8))


def test_authors_checkpoint_name_is_not_a_builtin():
    from crm_d2.refiner import Refiner

    with pytest.raises(FileNotFoundError, match="only built-in name.*passed by path.*README"):
        Refiner(weights="model_45705", device="cpu")


def test_title_outline_follows_the_text(side_by_side=side_by_side):
    grey = np.full((60, 400, 3), 128, np.uint8)
    tile = side_by_side(grey, [("ground truth", np.zeros((60, 400), np.uint8), [])])
    white = np.flatnonzero((tile.min(2) > 220).any(0))
    # the outline: darker than the grey by more than half (OpenCV 4 draws anti-aliased strokes fainter than 5)
    black = np.flatnonzero((tile.max(2) < 48).any(0))
    # the outline hugs the letters: it ends within a few pixels of where the white text ends
    assert len(white) and len(black) and abs(int(black[-1]) - int(white[-1])) <= 4
    assert abs(int(black[0]) - int(white[0])) <= 4


@pytest.mark.skipif(importlib.util.find_spec("detectron2") is not None, reason="detectron2 is installed")
@pytest.mark.parametrize("script", ["tools/train_net.py", "tools/demo.py", "datasets/make_tiny_coco.py"])
def test_detectron2_scripts_say_what_is_missing(script, tmp_path):
    proc = subprocess.run([sys.executable, script, str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"{script} needs detectron2: detectron2 is not installed (it is not on PyPI): " \
        "README.md, section 'Detectron2 extension', says how to install it"
    assert "## Detectron2 extension" in (REPO / "README.md").read_text()


def test_readme_says_what_the_tools_do():
    """The README and the manual pages it links (docs/refining.md, docs/training.md)."""
    text = " ".join(" ".join((REPO / page).read_text() for page in
                             ("README.md", "docs/refining.md", "docs/training.md")).split())
    assert 'Refiner(weights="model_45705")' not in text and "dvlab-research/Entity" in text
    assert "High-Quality-Segmention" in text and 'Refiner(weights="path/to/model_45705")' in text
    assert "soft mask" in text and "--binary" in text and "--overlay" in text and "run.json" in text
    assert re.search(r"crm_demo\.yaml.* train in about \d+( \+ \d+)+ minutes", text) and "few minutes" in text
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 160 and all(f"(docs/{page})" in readme for page in (
        "options.md", "refining.md", "panoptic.md", "training.md", "benchmark.md", "demo_model.md", "experiments.md"))


def test_read_mask_keeps_what_16_bit_and_cut_out_files_hold(tmp_path):
    from crm_d2.io import read_mask

    mask = np.zeros((40, 50), np.uint8)
    mask[10:30, 5:25] = 255
    for values in (mask, mask // 255, mask.astype(np.uint16) * 257):  # 0/255, 0/1 and 0..65535, all 16-bit
        cv2.imwrite(str(tmp_path / "m16.png"), values.astype(np.uint16))
        np.testing.assert_array_equal(read_mask(tmp_path / "m16.png") > 0, mask > 0)
    cut_out = np.zeros((40, 50, 4), np.uint8)  # black colour channels, the mask in alpha
    cut_out[..., 3] = mask
    cv2.imwrite(str(tmp_path / "cut.png"), cut_out)
    np.testing.assert_array_equal(read_mask(tmp_path / "cut.png", colour="refuse"), mask)
    empty = np.zeros((40, 50, 4), np.uint8)  # an empty mask saved with an opaque alpha stays empty
    empty[..., 3] = 255
    cv2.imwrite(str(tmp_path / "empty.png"), empty)
    assert not read_mask(tmp_path / "empty.png").any()


def test_benchmark_children_run_what_the_parent_asks(tmp_path):
    """A real run of tools/benchmark.py: each configuration's child process refines with the scales, the coarse
    factor and the thread count given to the parent, and fast mode is compared with exact mode's output."""
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(REPO / "tools" / "benchmark.py"), "--sizes", "300x200", "--modes", "exact",
                    "fast", "--weights", "demo", "--runs", "1", "--scales", "0.5", "1.0", "--coarse-factor", "8",
                    "--threads", "1", "--devices", "cpu", "--json", str(out)], check=True, capture_output=True,
                   timeout=300)
    results = {r["mode"]: r for r in json.loads(out.read_text())["results"]}
    assert sorted(results) == ["exact", "fast"] and not any("error" in r for r in results.values())
    assert all(r["threads"] == 1 and r["coarse_factor"] == 8.0 and r["hw"] == [200, 300] for r in results.values())
    assert [s["scale"] for s in results["exact"]["stages"]] == [0.5, 1.0]
    assert [s["scale"] for s in results["fast"]["stages"]] == [1.0]  # fast mode: the last stage only
    assert 90 < results["fast"]["iou_vs_exact"] <= 100
