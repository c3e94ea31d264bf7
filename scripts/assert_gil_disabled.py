"""Fail if importing cppnp turns the GIL back on in a free-threaded CPython (3.13t).

CPython re-enables the GIL when it imports an extension module that does not declare
free-threading support.  Run this WITHOUT PYTHON_GIL in the environment (PYTHON_GIL=0
would force the GIL off and hide the answer): it imports every module of cppnp, its
command line and its core, and checks sys._is_gil_enabled() is still False.
"""

import importlib
import os
import pkgutil
import sys
import warnings

if "PYTHON_GIL" in os.environ:
    sys.exit("assert_gil_disabled: unset PYTHON_GIL first (it forces the answer)")
if not hasattr(sys, "_is_gil_enabled") or sys._is_gil_enabled():
    sys.exit(
        "assert_gil_disabled: %s is not a free-threaded CPython with the GIL off" % sys.executable
    )
warnings.simplefilter("error", RuntimeWarning)  # "The global interpreter lock (GIL) has
names = []  # been enabled to load module ..."
for pkg in ("_core", "cppnp"):
    try:
        mod = importlib.import_module(pkg)
    except RuntimeWarning as exc:
        sys.exit("assert_gil_disabled: %s" % exc)
    names.append(pkg)
    for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
        if info.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(info.name)
        except RuntimeWarning as exc:
            sys.exit("assert_gil_disabled: %s" % exc)
        names.append(info.name)
if sys._is_gil_enabled():
    sys.exit("assert_gil_disabled: importing cppnp enabled the GIL")
print(
    "GIL still disabled after importing %d modules (%s)"
    % (len(names), ", ".join(sorted(n for n in names if n.startswith("_core."))))
)
