"""`crm-d2` command line: one entry point, one module per subcommand in `crm_d2.commands`.

Each command module defines `NAME`, `HELP`, `add_arguments(parser)` and `run(args) -> int` (and may define
`USAGE`, its usage line).
"""
import argparse
import importlib
import sys

from crm_d2 import __version__

# Order is the order shown by `crm-d2 --help`.
COMMANDS = ["demo", "refine", "eval", "panoptic", "instances", "pq", "train"]


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default, unless it is None or False or the help text already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.default in (None, False, argparse.SUPPRESS)
                or "default" in text):
            return text
        return f"{text} (default: %(default)s)"


def build_parser():
    parser = argparse.ArgumentParser(prog="crm-d2", description="Continuous Refinement Model toolkit")
    parser.add_argument("--version", action="version", version=f"crm-d2 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"crm_d2.commands.{name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP, usage=getattr(module, "USAGE", None),
                           formatter_class=HelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def command_parsers(parser=None):
    """{command name: its subparser} of `build_parser()` (or of `parser`): the one place that reaches into
    argparse's subparsers (the options table, the docs' command checks)."""
    parser = parser or build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; finished outputs are kept, rerun to resume", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as exc:
        # User-facing errors from the library carry their own explanation. Under torchrun, an error rank 0
        # decided (crm_d2.distributed.DistEnv.decide) stops every rank but is printed by rank 0 alone.
        if not getattr(exc, "said_by_rank0", False):
            print(f"crm-d2 {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
