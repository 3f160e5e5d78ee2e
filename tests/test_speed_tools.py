"""tools/maintain/speed_against_commit.py: a commit's crm_d2 from git, imported beside this checkout's and timed
against it in one process."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "maintain" / "speed_against_commit.py"
needs_git = pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                               reason="needs git and a git checkout of the project (the tool reads commits)")


def run_tool(*args):
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


@needs_git
def test_speed_against_commit_alternates_the_commits_own_package_with_this_checkout(tmp_path):
    """HEAD's package is extracted under its own name (crm_d2_<sha>), so both codes live in one process; every pair
    times both, and the warm-up outputs are compared. Where this checkout's crm_d2 is HEAD's, they are the same."""
    out = run_tool("HEAD", "--sizes", "96x80", "--pairs", "2", "--threads", "1", "--json", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stderr
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True,
                         check=True).stdout.strip()
    got = json.loads((tmp_path / "r.json").read_text())
    assert got["commit"] == sha and got["commit_refiner"] == f"crm_d2_{sha}.refiner.Refiner"
    (row,) = got["rows"]
    assert row["input"] == "scene 0" and row["size"] == "96x80" and row["threads"] == 1
    assert len(row["seconds"]["commit"]) == len(row["seconds"]["this"]) == len(row["speedups"]) == 2
    assert all(s > 0 for s in row["seconds"]["commit"] + row["seconds"]["this"])
    assert "| 96x80 | scene 0 |" in out.stdout and f"{sha} s" in out.stdout
    unchanged = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", "crm_d2"]).returncode == 0
    if unchanged:
        assert row["max_abs_diff"] == 0 and row["pixels_across_half"] == 0


@needs_git
def test_speed_against_commit_names_a_commit_git_does_not_know():
    out = run_tool("no-such-commit-here", "--sizes", "96x80")
    assert out.returncode != 0
    assert "cannot take crm_d2 from commit 'no-such-commit-here'" in out.stderr.strip().splitlines()[-1]
