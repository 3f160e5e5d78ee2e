"""Every command that README.md and docs/ show names things that exist: `crm-d2 COMMAND` with options that command
has, scripts under tools/ and datasets/ with options they define, and config files that are in the repository.
(The README's own examples also run, in tests/test_readme.py; this keeps the rest from going stale when files
move or options change.)"""
import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from crm_d2.cli import command_parsers

REPO = Path(__file__).resolve().parents[1]
PAGES = ["README.md", "configs/README.md", "tools/README.md", "datasets/README.md"] + \
    sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))


def shown_commands(text):
    """Command lines in fenced shell blocks (continuation lines joined) and in inline code spans."""
    commands = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            commands.append(line.split(" #", 1)[0].strip())
    commands += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    starts = ("crm-d2 ", "python tools/", "python datasets/", "torchrun ")
    return [c for c in commands if c.startswith(starts) or "python tools/" in c or "crm-d2 " in c]


def words(command):
    try:
        return shlex.split(command)
    except ValueError:  # an unbalanced quote in prose
        return command.split()


def cli_flags():
    return {name: {s for a in p._actions for s in a.option_strings} for name, p in command_parsers().items()}


# detectron2's default_argument_parser (tools/train_net.py), which tools/train_crm.py passes on to `crm-d2 train`
DETECTRON2_FLAGS = {"--config-file", "--resume", "--eval-only", "--num-gpus", "--num-machines", "--machine-rank",
                    "--dist-url", "--opts"}


@functools.cache
def script_flags(path):
    """The options a script's parser defines, as its --help lists them. A script that cannot run here (one that
    needs detectron2) is read instead: the quoted "--flag" strings of its source, and detectron2's flags where
    it uses default_argument_parser."""
    source = path.read_text()
    run = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    if run.returncode == 0:
        found = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", run.stdout))
    else:
        found = set(re.findall(r"""["'](--[a-z][a-z0-9-]*)["']""", source))
    if "default_argument_parser" in source:
        found |= DETECTRON2_FLAGS
    return found


def problems(command, flags):
    found = []
    toks = [t.strip("[]()|,;") for t in words(command)]
    for i, tok in enumerate(toks):
        if re.fullmatch(r"(configs|tools|datasets)/[\w./-]+\.(yaml|py)", tok) and "*" not in tok:
            if not (REPO / tok).is_file():
                found.append(f"{tok} does not exist")
    if "crm-d2" in toks or "crm_d2.cli" in toks:
        at = toks.index("crm-d2") if "crm-d2" in toks else toks.index("crm_d2.cli")
        rest = [t for t in toks[at + 1:] if t]
        if rest and not rest[0].startswith("-"):
            name = rest[0]
            if name not in flags and name.isidentifier() and name != "COMMAND":
                found.append(f"crm-d2 has no command {name!r}")
            elif name in flags:
                found += [f"crm-d2 {name} has no option {t}" for t in rest[1:]
                          if t.startswith("--") and t.split("=")[0] not in flags[name]]
    for i, tok in enumerate(toks):
        if re.fullmatch(r"(tools|datasets)/[\w/]+\.py", tok) and (REPO / tok).is_file():
            known = script_flags(REPO / tok) | {"--help"}
            for t in toks[i + 1:]:
                if t.startswith("--") and t.split("=")[0] not in known and not t.startswith("--opts"):
                    found.append(f"{tok} has no option {t}")
    return found


@pytest.mark.parametrize("page", PAGES)
def test_commands_on_the_page_name_what_exists(page):
    flags = cli_flags()
    text = (REPO / page).read_text()
    bad = [f"{c!r}: {p}" for c in shown_commands(text) for p in problems(c, flags)]
    assert bad == [], f"{page}:\n" + "\n".join(bad)


def test_the_check_sees_a_wrong_option_and_a_moved_file():
    flags = cli_flags()
    # a script's options are its parser's: a word of its source that is no option does not count
    assert "--threads" in script_flags(REPO / "tools" / "heldout_eval.py")
    assert not problems("python tools/heldout_eval.py --weights demo --threads 2", flags)
    assert problems("python tools/heldout_eval.py --weights demo --thread 2", flags)
    assert problems("crm-d2 refine photo.jpg coarse.png -o out.png --no-such-flag", flags)
    assert problems("python tools/calibrate_grabcut.py --weights demo", flags)  # moved to tools/maintain/
    assert problems("crm-d2 train --config configs/crm_r50_paper.yaml", flags)  # moved to configs/training/
    assert not problems("crm-d2 train --config configs/training/crm_r50_paper.yaml --resume", flags)
