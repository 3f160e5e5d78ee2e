"""Write docs/options.md, every option of crm_d2 under all of its names, from the option definitions themselves.

    python tools/maintain/options_doc.py            # rewrite docs/options.md
    python tools/maintain/options_doc.py --check    # exit 1 if docs/options.md is not what the definitions give

Names and defaults come from where they are defined: `Refiner.__init__` / `refine` / `refine_batch`'s
signatures, the `FastOptions` and `SegmentRefineOptions` dataclasses, the `crm-d2` argparse parser and the
`cfg.MODEL.CRM.*` assignments of crm_d2/d2/config.py (read as source, so that this runs without detectron2). What
an option does is its CLI help, else the comment above its D2 key, else the Refiner docstring's entry. What is
written here by hand is only which names are one option (ROWS) and when to change it. tests/test_options_doc.py
fails when a definition has no row or when docs/options.md is stale.
"""
import argparse
import ast
import dataclasses
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from crm_d2 import FastOptions, Refiner  # noqa: E402
from crm_d2.cli import build_parser, command_parsers  # noqa: E402
from crm_d2.panoptic.refine import SegmentRefineOptions  # noqa: E402

OUTPUT = ROOT / "docs" / "options.md"
D2_CONFIG = ROOT / "crm_d2" / "d2" / "config.py"

# The Python names a row may use, and where their defaults live.
PYTHON = {
    "Refiner": Refiner.__init__,
    "refine": Refiner.refine,  # refine and refine_batch take the same keyword arguments
    "FastOptions": FastOptions,
    "SegmentRefineOptions": SegmentRefineOptions,
}
DATACLASSES = ("FastOptions", "SegmentRefineOptions")
# Parameters that are inputs, not options.
NOT_OPTIONS = {("Refiner", "self"), ("refine", "self"), ("refine", "image"), ("refine", "mask"),
               ("refine_batch", "self"), ("refine_batch", "image"), ("refine_batch", "masks")}


def row(python=(), cli=(), d2=(), when="", what=""):
    """One option: its Python names ("Refiner.scales", "refine.roi"), CLI flags ("--fast", or "--output@train"
    for the flag of some commands only) and D2 keys ("SCALES" for MODEL.CRM.SCALES)."""
    as_tuple = (lambda v: (v,) if isinstance(v, str) else tuple(v))
    return {"python": as_tuple(python), "cli": as_tuple(cli), "d2": as_tuple(d2), "when": when, "what": what}


TOPICS = [
    ("Weights and device", "Which model runs, and where.", [
        row("Refiner.weights", "--weights", "WEIGHTS",
            "The authors' file for real work; the demo model to try the tool; your own checkpoint after "
            "`crm-d2 train` (README, \"Which weights\")."),
        row("Refiner.device", "--device", (), "On a machine with several GPUs, or to force the CPU. Detectron2 "
            "runs CRM on `MODEL.DEVICE`."),
        row("Refiner.allow_random", when="Tests and benchmarks of speed only: the outputs mean nothing."),
        row("Refiner.config", when="With `weights=None` (tests, benchmarks): `CRMConfig.preset(\"r50\")` etc."),
        row((), (), "ENABLED", "False gives the base model bit for bit, for a baseline run of the same config."),
        row((), (), "BASE_META_ARCHITECTURE", "Set by each configs/*-CRM.yaml to the model it wraps."),
    ]),
    ("Schedule", "The scales CRM refines at, and how often.", [
        row(("Refiner.scales", "refine.scales", "SegmentRefineOptions.scales"), "--scales", "SCALES",
            "Leave it: the checkpoint's own schedule is the one it was made for. `auto` for a checkpoint "
            "without one, on photos far from its training size."),
        row("Refiner.rounds", "--rounds", "ROUNDS",
            "`3:0.3` for single objects known to be 16x coarse or polygons (16x: 64.58 -> 68.99 mBA on held-out "
            "photos); it costs touching parts (demo PQ 68.01 -> 66.89). docs/experiments.md, \"Rounds\"."),
    ]),
    ("Region of interest", "Refine each mask's box with context, not the whole photo (the paper's CRM*).", [
        row("refine.roi", "--roi", (), "Small objects in large photos: faster, and the photo outside the box "
            "cannot pull the mask. The panoptic and instance paths always refine ROIs."),
        row(("refine.margin", "SegmentRefineOptions.margin"), "--margin", "ROI_MARGIN",
            "More context for objects whose box cuts through them; 0.5 was chosen on the demo sample."),
        row(("refine.max_side", "SegmentRefineOptions.max_side"), "--max-side", "MAX_SIDE",
            "`512` on soft high-resolution photos (upscaled, compressed, out of focus): better and faster with "
            "the demo model (docs/demo_model.md, 2K)."),
    ]),
    ("Fast mode", "The last stage alone, re-decoding only a band around the coarse boundary (with "
     "`last_stage_only=False`: every stage, the later ones banded around the previous boundary). Not bit-exact.", [
        row("Refiner.mode", "--fast", "FAST",
            "2K and larger photos when seconds matter; mBA and speed against exact mode in docs/benchmark.md."),
        row("Refiner.fast", when="To pass `FastOptions` (below)."),
        row("FastOptions.band", when="Wider for masks far from the object (very coarse input)."),
        row("FastOptions.unsettled"), row("FastOptions.tile"), row("FastOptions.halo"),
        row("FastOptions.band_from"), row("FastOptions.coarse_band"),
        row("FastOptions.next_grid", when="Leave on: with the four-scale schedule at 4K, next_grid and band_full "
            "take fast mode's mBA gap to exact mode from 0.77 to 0.30 and 0.20 (docs/benchmark.md)."),
        row("FastOptions.band_full", when="As next_grid."),
        row("FastOptions.last_stage_only",
            when="True skips the stages before the last: with the shipped model's `auto` schedule they are "
                 "banded around the same coarse boundary at a lower resolution, so they reach no further, and "
                 "they cost 30-40 % of fast mode's time. "
                 "False for masks far off their object: every stage runs, the high ones banded around the "
                 "previous stage's boundary. On a 16x-coarse 2K scene fast mode's mBA is 1.37 below exact mode's "
                 "by default and 0.77 below with False (10.8x and 7.5x faster than exact); at 8x both are within "
                 "0.12 (docs/benchmark.md)."),
    ]),
    ("Finish steps", "Run on each refined probability, after the model.", [
        row("Refiner.edge_snap", "--edge-snap", "EDGE_SNAP",
            "`1:1:0.01` for masks from an 8-16x lower-resolution segmenter (model alone, held-out 16x: 64.58 -> "
            "69.03 mBA instead of 67.40); it costs good masks (4x: 89.32 -> 88.84). `1:2:0.003:0.3` snaps only "
            "masks that refinement moved: for masks of unknown quality. docs/experiments.md, \"Edge snap\"."),
        row("Refiner.grabcut", "--grabcut", "GRABCUT",
            "Leave the demo model's gated cut on. `2` only for masks known to be coarse (16x: 73.61 mBA); it "
            "wrecks good masks (4x: 90.05 -> 77.20). docs/demo_model.md, \"After the model\"."),
    ]),
    ("Memory and batches", "Peak memory follows these, not the photo's size.", [
        row("Refiner.memory_budget", "--memory-budget-mb", (),
            "Lower on a small GPU (256 MB fits 6000x4000 in a 4 GiB card); higher changes little."),
        row("Refiner.max_batch", when="Masks encoded together; lower if many masks of a 6K photo run out of "
            "memory."),
        row(("SegmentRefineOptions.batch_size",), "--batch-size", "BATCH_SIZE",
            "Memory: this many full-size float maps per call."),
        row("Refiner.amp", (), "AMP", "On CUDA, for speed (bfloat16 encoder; error in docs/benchmark.md)."),
    ]),
    ("Output", "What is written, and where.", [
        row("refine.output", "--binary", (), "`binary` (`--binary`) for a mask; the soft default keeps the "
            "threshold yours."),
        row("refine.bgr", what="The image's channels are in OpenCV's order, BGR; RGB otherwise.",
            when="`True` for arrays from `cv2.imread`."),
        row((), "--output@demo,refine,panoptic,instances", (),
            "A new folder for other settings: a folder run refuses to mix settings."),
        row((), "--overwrite@refine", (), "To redo a `refine` folder with other settings."),
        row((), "--report", "REPORT",
            "To see which categories CRM helps and hurts, and the segments it changed most (docs/panoptic.md, "
            "\"The report\"). `crm-d2 demo` writes one by default; Detectron2 writes one per dataset."),
        row((), "--overwrite@demo,panoptic,instances", (),
            "Only to let `--report` replace another run's report; it does not redo the run."),
        row((), "--overlay", (), "To judge your own results by eye."),
        row((), "--no-overlays"),
        row((), "--json", (), "For scripts."),
    ]),
    ("Panoptic and instance segments", "How `crm-d2 panoptic` / `instances` and the Detectron2 adapter refine "
     "every segment (docs/panoptic.md).", [
        row("SegmentRefineOptions.targets", "--targets", "TARGETS"),
        row("SegmentRefineOptions.min_area", "--min-area", "MIN_AREA"),
        row("SegmentRefineOptions.band", "--band", "BAND",
            "0 lets CRM move pixels anywhere in the ROI, which grows parts into their objects (docs/panoptic.md)."),
        row("SegmentRefineOptions.merge", "--merge", "MERGE"),
        row("SegmentRefineOptions.threshold"),
        row("SegmentRefineOptions.drop_empty", "--drop-empty", "DROP_EMPTY"),
        row((), "--non-overlapping", "NON_OVERLAPPING_INSTANCES", "Entity outputs (EntitySeg)."),
        row((), "--entity", (), "Class-agnostic entity AP (the paper's Entity numbers)."),
        row((), "--score-thresh"),
        row((), (), "REFINE"),
        row((), "--limit", (), "A quick look at a large dataset."),
        row((), "--workers"),
    ]),
    ("Inputs of the commands", "", [
        row((), "inputs@refine"), row((), "--big-dir"), row((), "--pred-dir"), row((), "--images"),
        row((), "--pred-json"), row((), "--gt-json"), row((), "--gt-dir"), row((), "--skip-bad"),
        row((), "--sample"), row((), "--long-side"), row((), "--factor"), row((), "--regions"),
    ]),
    ("Training (`crm-d2 train`)", "The recipe's keys are in its YAML file (docs/training.md).", [
        row((), "--config-file"), row((), "--output@train"), row((), "--resume"), row((), "overrides@train"),
    ]),
]


# (command, flag) pairs that a row names for some commands only ("--output@train"): no plain row takes them
CLAIMED = {(c, f) for _, _, rows in TOPICS for r in rows for spec in r["cli"] if "@" in spec
           for f, _, cs in [spec.partition("@")] for c in cs.split(",")}


# ------------------------------------------------------------------------------------------- the definitions
def python_options():
    """{"Refiner.scales": default, ...} from the signatures and dataclasses."""
    found = {}
    for owner, obj in PYTHON.items():
        if dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                found[f"{owner}.{f.name}"] = f.default
        else:
            for name, p in inspect.signature(obj).parameters.items():
                if (owner, name) not in NOT_OPTIONS:
                    found[f"{owner}.{name}"] = p.default
    return found


def refine_batch_matches_refine():
    """refine_batch takes refine's options (the doc lists them once, as `refine`)."""
    names = lambda f: [n for n in inspect.signature(f).parameters if ("refine", n) not in NOT_OPTIONS
                       and ("refine_batch", n) not in NOT_OPTIONS]
    return names(Refiner.refine) == names(Refiner.refine_batch)


def cli_options():
    """{(command, flag): argparse action}; the flag is the longest option string, or the dest of a positional."""
    found = {}
    for command, p in command_parsers(build_parser()).items():
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = max(action.option_strings, key=len) if action.option_strings else action.dest
            found[(command, flag)] = action
    return found


def d2_options():
    """{"SCALES": (default, comment)} read from crm_d2/d2/config.py's source (no detectron2 needed)."""
    source = D2_CONFIG.read_text()
    lines = source.splitlines()
    namespace = {"core": SegmentRefineOptions(), "float": float, "int": int, "bool": bool}
    found = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        target = ast.unparse(node.targets[0])
        if not target.startswith("cfg.MODEL.CRM."):
            continue
        comment, i = [], node.lineno - 2
        while i >= 0 and lines[i].strip().startswith("#"):
            comment.insert(0, lines[i].strip()[1:].strip())
            i -= 1
        found[target[len("cfg.MODEL.CRM."):]] = (eval(compile(ast.Expression(node.value), "config", "eval"),
                                                      namespace), " ".join(comment))
    return found


def refiner_docstring():
    """{"scales": text} from the Args section of Refiner's docstring."""
    doc = inspect.getdoc(Refiner)
    args = doc.split("Args:", 1)[1]
    found, name = {}, None
    for line in args.splitlines():
        m = re.match(r"^    (\w+): (.*)$", line)
        if m:
            name = m.group(1)
            found[name] = m.group(2)
        elif name and line.startswith("        "):
            found[name] += " " + line.strip()
    return found


def dataclass_docstring(cls):
    """{"band": text} from a dataclass docstring that describes its fields as "name: text" ("a/b: text" for two)."""
    text = " ".join(inspect.getdoc(cls).split())
    names = "|".join(f.name for f in dataclasses.fields(cls))
    marks = list(re.finditer(rf"\b((?:{names})(?:/(?:{names}))*): ", text))
    found = {}
    for m, nxt in zip(marks, marks[1:] + [None]):
        body = text[m.end():nxt.start() if nxt else len(text)].strip().rstrip(";").strip()
        for name in m.group(1).split("/"):
            found[name] = body
    return found


# --------------------------------------------------------------------------------------------------- matching
def cli_rows(cli, spec):
    """The (command, flag) pairs a row's CLI spec names: "--flag@cmd1,cmd2" or every command with "--flag"
    that no other row claims for itself."""
    flag, _, commands = spec.partition("@")
    if commands:
        return [(c, flag) for c in commands.split(",")]
    return sorted(k for k in cli if k[1] == flag and k not in CLAIMED)


def definitions():
    """(python, cli, d2): every option as its code defines it, read once for `coverage` and `render`."""
    return python_options(), cli_options(), d2_options()


def coverage(defs=None):
    """(missing, unknown): definitions no row names, and row names that are not defined."""
    py, cli, d2 = defs or definitions()
    named_py = {n for t in TOPICS for r in t[2] for n in r["python"]}
    named_cli = {k for t in TOPICS for r in t[2] for s in r["cli"] for k in cli_rows(cli, s)}
    named_d2 = {n for t in TOPICS for r in t[2] for n in r["d2"]}
    missing = sorted(set(py) - named_py) + [f"crm-d2 {c} {f}" for c, f in sorted(set(cli) - named_cli)] + \
        [f"MODEL.CRM.{k}" for k in sorted(set(d2) - named_d2)]
    unknown = sorted(named_py - set(py)) + [f"crm-d2 {c} {f}" for c, f in sorted(named_cli - set(cli))] + \
        [f"MODEL.CRM.{k}" for k in sorted(named_d2 - set(d2))] + \
        [f"CLI row {s!r} names no command" for t in TOPICS for r in t[2] for s in r["cli"] if not cli_rows(cli, s)]
    return missing, unknown


# --------------------------------------------------------------------------------------------------- writing
def shown(value):
    if value is inspect.Parameter.empty or value is dataclasses.MISSING:
        return "required"
    if value is None:
        return "None"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.startswith(str(ROOT)):
        value = str(Path(value).relative_to(ROOT))  # a path in this checkout: as from the repository's root
    if isinstance(value, int) and value >= 1 << 20 and value % (1 << 20) == 0:
        return f"{value >> 20} << 20"
    return repr(value) if isinstance(value, str) else str(value)


def cell(text):
    return " ".join(str(text).split()).replace("|", "\\|")


def render(defs=None):
    (py, cli, d2), doc = defs or definitions(), refiner_docstring()
    out = [
        "# Options",
        "",
        "Every option of crm_d2, under each of its names: the Python API (`Refiner(...)`, `refine(...)` and "
        "`refine_batch(...)`, which take the same keywords, `FastOptions`, and `SegmentRefineOptions` for the "
        "panoptic and instance paths), the `crm-d2` commands, and the Detectron2 keys `MODEL.CRM.*` "
        "(`crm_d2/d2/config.py`). Names on one row are one option. When nothing is said, all three mean the "
        "same: the defaults of the panoptic command and of `MODEL.CRM.*` are `SegmentRefineOptions`'s, and an "
        "empty value (`None`, `\"\"`, `[]`) means the checkpoint's own setting.",
        "",
        "This page is written by `python tools/maintain/options_doc.py` from the definitions themselves; "
        "`tests/test_options_doc.py` fails when an option is missing or the page is stale.",
    ]
    for title, intro, rows in TOPICS:
        out += ["", f"## {title}", ""]
        if intro:
            out += [intro, ""]
        out += ["| Python | CLI | Detectron2 | Default | What it does | When to change it |",
                "|---|---|---|---|---|---|"]
        for r in rows:
            defaults, what = [], r["what"]
            names_py = []
            for n in r["python"]:
                owner, name = n.split(".")
                names_py.append(f"`{owner}({name}=)`")
                defaults.append(("Python", shown(py[n])))
            names_cli = []
            for spec in r["cli"]:
                pairs = cli_rows(cli, spec)
                flag = spec.partition("@")[0]
                commands = [c for c, _ in pairs]
                names_cli.append(f"`{flag}` ({', '.join(commands)})")
                for c, f in pairs:
                    action = cli[(c, f)]
                    what = what or (action.help or "")
                    default = ("off" if isinstance(action, argparse._StoreTrueAction)
                               else "none" if action.nargs in ("*", "?") and not action.option_strings
                               else "required" if action.required else shown(action.default))
                    defaults.append((f"`{c}`", default))
            names_d2 = []
            for k in r["d2"]:
                names_d2.append(f"`MODEL.CRM.{k}`")
                value, comment = d2[k]
                defaults.append(("D2", shown(value)))
                what = what or comment
            if not what:
                for n in r["python"]:
                    owner, name = n.split(".")
                    if owner == "Refiner" and name in doc:
                        what = doc[name]
                        break
            if not what and r["python"]:
                owner, name = r["python"][0].split(".")
                what = dataclass_docstring(PYTHON[owner]).get(name, "") if owner in DATACLASSES else ""
            by_value = {}
            for who, value in defaults:
                by_value.setdefault(value, []).append(who)
            default = next(iter(by_value)) if len(by_value) == 1 else "; ".join(
                f"{value} ({', '.join(dict.fromkeys(who))})" for value, who in by_value.items())
            out.append(f"| {' '.join(names_py) or '-'} | {' '.join(names_cli) or '-'} | {' '.join(names_d2) or '-'} "
                       f"| {cell(default)} | {cell(what)} | {cell(r['when'])} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/options.md is stale or incomplete")
    args = p.parse_args(argv)
    defs = definitions()
    missing, unknown = coverage(defs)
    if missing or unknown or not refine_batch_matches_refine():
        print(f"options without a row: {missing}; rows naming no option: {unknown}", file=sys.stderr)
        return 1
    text = render(defs)
    if args.check:
        if not OUTPUT.is_file() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is stale: run python tools/maintain/options_doc.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
