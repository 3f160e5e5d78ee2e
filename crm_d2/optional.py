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


def dependency_versions():
    """["python 3.11.7", "torch 2.13.0", ...]: Python and what the installed crm_d2 declares (install_requires and
    the test extra), at the installed versions. The header of every test log and CI's record of what it ran on."""
    import platform
    import re
    from importlib import metadata

    declared = [re.match(r"[A-Za-z0-9_.-]+", r).group(0) for r in metadata.requires("crm_d2") or []
                if "extra" not in r or 'extra == "test"' in r]
    found = [f"python {platform.python_version()}"]
    for dist in declared:
        try:
            found.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            found.append(f"{dist} (not installed)")
    return found
