"""Optional dependencies: when one is missing, say so in one line and where the README explains installing it."""
import importlib.util
import sys

DETECTRON2_HINT = ("detectron2 is not installed (it is not on PyPI): README.md, section 'Detectron2 extension', "
                   "says how to install it")


def require_detectron2(script):
    """Exit with one line instead of an import traceback when detectron2 is absent (`script`: who needs it).

    Only an absent package is caught: a detectron2 that is installed but fails to import shows its own error."""
    if importlib.util.find_spec("detectron2") is None:
        sys.exit(f"{script} needs detectron2: {DETECTRON2_HINT}")
