"""README.md's own examples run as written: the Python block and the command-line block, in a scratch folder that
holds the files they name (a generated photo with its coarse mask, and a BIG-layout folder). The Detectron2 block
is run by tests/test_d2.py, the two set-up commands by CI (.ci/run)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from crm_d2.train.synthetic import make_scene, write_big_folder

REPO = Path(__file__).resolve().parents[1]


def readme_block(marker, language):
    """The fenced block of `language` that follows `<!-- marker -->` in README.md."""
    text = (REPO / "README.md").read_text()
    assert f"<!-- {marker} -->" in text, f"README.md has no <!-- {marker} --> block"
    return text.split(f"<!-- {marker} -->", 1)[1].split(f"```{language}\n", 1)[1].split("```", 1)[0]


@pytest.fixture
def scratch(tmp_path):
    """photo.jpg + coarse.png (a small generated scene and its coarse mask) and BIG/ with two triplets."""
    scene = make_scene((120, 160), seed=3)
    cv2.imwrite(str(tmp_path / "photo.jpg"), scene.image[..., ::-1])
    cv2.imwrite(str(tmp_path / "coarse.png"), scene.coarse)
    write_big_folder(tmp_path / "BIG", 2, size=(96, 128), seed=1)
    return tmp_path, scene


def test_readme_python_block_runs_as_written(scratch, monkeypatch):
    folder, scene = scratch
    code = readme_block("readme-python", "python")
    monkeypatch.chdir(folder)
    names = {}
    exec(compile(code, "README.md (readme-python)", "exec"), names)
    prob, sharp, probs = names["prob"], names["sharp"], names["probs"]
    assert prob.shape == sharp.shape == scene.coarse.shape and prob.dtype == np.float32 and sharp.dtype == bool
    np.testing.assert_array_equal(sharp, prob > 0.5)
    assert probs.shape == (2,) + scene.coarse.shape
    written = cv2.imread(str(folder / "refined.png"), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(written > 0, sharp)


def test_readme_command_line_block_runs_as_written(scratch):
    folder, _ = scratch
    block = readme_block("readme-cli", "bash")
    commands = [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]
    assert [c.split()[:2] for c in commands] == [["crm-d2", "refine"]] * 2 + [["crm-d2", "eval"]]
    # `crm-d2` is the one installed beside this interpreter
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", "-ec", block], cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert cv2.imread(str(folder / "refined.png"), cv2.IMREAD_GRAYSCALE).shape == (120, 160)
    assert sorted(p.name for p in (folder / "refined").glob("*.png")) == sorted(
        p.name.replace("_seg", "") for p in (folder / "BIG").glob("*_seg.png"))
    assert len(list((folder / "pictures").glob("*.png"))) == 2
    assert re.search(r"mBA", proc.stdout) and re.search(r"coarse", proc.stdout)
