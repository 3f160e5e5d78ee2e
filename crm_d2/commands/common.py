"""What every refining command shares: the model options, `--scales`, the run-settings record, and the one place
that turns the options into a Refiner."""
import argparse
import json
from pathlib import Path

from ..checkpoint import weights_fingerprint
from ..io import write_json

SCALES_HELP = "list of scales, or 'auto' (default: the model's own schedule)"


def add_model_arguments(parser, weights_default="demo"):
    """--weights, --device, --memory-budget-mb, --fast (weights_default None makes --weights required)."""
    what = ("'demo' (the small model shipped with crm_d2), or the path of a crm_d2 checkpoint or of the authors' "
            "released file (model_45705: README, 'Which weights')")
    parser.add_argument("--weights", default=weights_default, required=weights_default is None,
                        help=f"CRM weights: {what}")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    parser.add_argument("--memory-budget-mb", type=int, default=512,
                        help="decoder memory per step; the encoder runs in row tiles above 4x this")
    parser.add_argument("--fast", action="store_true",
                        help="fast mode: refine only a band around each coarse mask's boundary, at the last "
                             "scale (not bit-exact; docs/benchmark.md)")
    parser.add_argument("--edge-snap", default=None, metavar="R:P:EPS[:MIN_SHIFT]", type=edge_snap_argument,
                        help="guided filter of the refined probability with the photo: "
                             "RADIUS[:PASSES[:EPS[:MIN_SHIFT]]] or 'off' (default: the model's own; "
                             "docs/options.md, 'Finish steps')")
    parser.add_argument("--rounds", default=None, metavar="COUNT[:MIN_SHIFT]", type=rounds_argument,
                        help="refine again each mask that the last round moved by at least MIN_SHIFT px on average, "
                             "up to COUNT rounds (default: the model's own, else 1; docs/options.md, 'Schedule')")
    parser.add_argument("--grabcut", default=None, metavar="BAND[:ITERS[:MIN_SHIFT]]", type=grabcut_argument,
                        help="decide the pixels within BAND px of the refined boundary again with OpenCV's GrabCut, "
                             "or 'off' (default: the model's own; the demo model's is gated per mask; a band given "
                             "here cuts every mask: docs/options.md, 'Finish steps')")


def add_report_arguments(parser, default_help="no report"):
    """--report DIR and --overwrite (crm_d2.report): the page to look at, and leave to replace another run's."""
    parser.add_argument("--report", default=None, metavar="DIR",
                        help="write a report to look at in DIR/index.html: the with/without and per-category "
                             f"tables and the segments refinement changed most, outlined on the photo ({default_help})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the report of another run that the report folder holds (refused otherwise); "
                             "it does not redo the run: for other settings use another -o")


def model_settings(args):
    """What `add_model_arguments` adds that decides a run's outputs (device and memory budget do not), for the
    settings a folder run records and checks (`check_run_settings`)."""
    return {"weights": str(args.weights), "fast": args.fast, "edge_snap": args.edge_snap, "rounds": args.rounds,
            "grabcut": args.grabcut}


def _checked(parse, text):
    """An option parsed when argparse reads it: a bad value is a usage error naming the accepted form."""
    try:
        return parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _written(option_class, text):
    """An option checked when parsed and written in its one form (`inputs.option_text`), so that run records
    compare equal; None when nothing is said (the model's own)."""
    from ..inputs import option_text

    opt = _checked(option_class.parse, text)
    return None if opt is None else option_text(opt)


def edge_snap_argument(text):
    from ..guided import EdgeSnap

    return _written(EdgeSnap, text)


def grabcut_argument(text):
    from ..grabcut import GrabCut

    return _written(GrabCut, text)


def rounds_argument(text):
    from ..schedule import Rounds

    return _written(Rounds, text)


class ScalesAction(argparse.Action):
    """`--scales 0.25 0.5 1` -> [0.25, 0.5, 1.0]; `--scales auto` -> "auto" (the two forms Refiner takes)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if "auto" in values:
            if len(values) > 1:
                raise argparse.ArgumentError(self, f"'auto' stands alone, got {' '.join(values)}")
            setattr(namespace, self.dest, "auto")
            return
        try:
            setattr(namespace, self.dest, [float(v) for v in values])
        except ValueError:
            raise argparse.ArgumentError(self, f"expected numbers or 'auto', got {' '.join(values)}") from None


def add_scales_argument(parser):
    parser.add_argument("--scales", nargs="+", action=ScalesAction, default=None, metavar="S", help=SCALES_HELP)


def build_refiner(args, device=None):
    """`device` overrides --device: under torchrun each rank's own GPU (crm_d2.distributed.session)."""
    from ..refiner import Refiner

    device = args.device if device is None else str(device)
    return Refiner(weights=args.weights, device=device, scales=getattr(args, "scales", None),
                   memory_budget=args.memory_budget_mb << 20, mode="fast" if getattr(args, "fast", False) else "exact",
                   edge_snap=getattr(args, "edge_snap", None), rounds=getattr(args, "rounds", None),
                   grabcut=getattr(args, "grabcut", None))


def _changes(old, new, prefix=""):
    """'key old -> new' for every setting that differs (nested dicts by their dotted keys)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changes(a, b, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k} {a!r} -> {b!r}")
    return out


def check_run_settings(out_dir, settings, replace=False, redo_flag=None):
    """Record the settings of a run in OUT/run.json; refuse to resume into OUT under different settings, so that
    a resumed run never mixes two configurations. `replace`: the caller redoes everything, record the new ones.
    `redo_flag`: the option that redoes the run (named in the refusal). Settings that name weights also record
    the file's fingerprint: a name or a path is not the model (the shipped "demo" changes between releases)."""
    if settings.get("weights") not in (None, "None"):
        settings = {**settings, "weights_sha256": weights_fingerprint(settings["weights"])}
    settings = json.loads(json.dumps(settings))  # as they read back from run.json (tuples become lists)
    path = Path(out_dir) / "run.json"
    if path.is_file() and not replace:
        with open(path) as f:
            old = json.load(f)
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            redo = f"rerun with {redo_flag} to redo it with these settings, or use another -o" if redo_flag else \
                f"use another -o or delete {out_dir} (its outputs are the other run's)"
            raise ValueError(f"{out_dir} holds a run with other settings ({', '.join(diff)} differ: "
                             f"{'; '.join(_changes(old, settings))}); {redo}")
    else:
        write_json(path, settings)
