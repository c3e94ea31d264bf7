#!/usr/bin/env bash
# ThreadSanitizer run of the thread-heavy tests on free-threaded CPython 3.13t, GIL off.
#
# The interpreter comes from tools/free-threaded-python.sh (built once, cached under
# ~/.cache/cppnp); it is NOT instrumented, only our extensions are: they are built with
# -fsanitize=thread from a fresh copy of the source tree into their own virtualenv
# (.venv-tsan), and pytest runs with libtsan preloaded, PYTHON_GIL=0, and address-space
# randomisation off (TSan's shadow memory layout does not fit this kernel's mmap
# randomisation otherwise).
#
# Every report goes to $TSAN_LOG_DIR (log_path: one file per process, subprocesses
# included).  Reports whose frames are all inside CPython are suppressed by name in
# scripts/tsan.supp (each entry says why).  The run FAILS on a test failure or on any
# report left after the suppressions; a report with a frame in our own code (_core, a .pyx
# line, a __pyx_ function) is listed as "ours" first, with both stacks.
#
# Environment:
#   TSAN_VENV      virtualenv directory (default .venv-tsan)
#   TSAN_LOG_DIR   where reports go (default build/tsan-logs, wiped first)
#   TSAN_TESTS     test files to run, from tests/ (default: the thread-heavy files below)
#   PYTEST_ARGS    extra pytest options (default none)
#   CPPNP_FT_PYTHON  an existing free-threaded python (see tools/free-threaded-python.sh)
#
# Usage: scripts/tsan.sh [pytest args]    e.g. scripts/tsan.sh test_thread_pool.py -k stop
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$(realpath -m "${TSAN_VENV:-.venv-tsan}")"
LOGDIR="$(realpath -m "${TSAN_LOG_DIR:-$ROOT/build/tsan-logs}")"
SUPP="$ROOT/scripts/tsan.supp"
CC="${CC:-gcc}"
# The files where threads meet: the pool and its hand-off to the loop, cross-thread sends,
# connection lifetime across threads, the fault suite's thread rows, and the stress tests.
DEFAULT_TESTS="test_thread_pool.py test_faults_threads.py test_lifetime.py test_stress.py \
test_tcp_connection.py test_event_loop.py"

say() { printf '[tsan] %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 2; }

# -- 1. runtime and interpreter ------------------------------------------------------------
LIBTSAN="$("$CC" -print-file-name=libtsan.so)"
[[ "$LIBTSAN" == /* && -e "$LIBTSAN" ]] \
    || die "libtsan not found ($CC -print-file-name=libtsan.so -> $LIBTSAN);" \
           "install it: apt-get install libtsan2 (gcc 12: with libgcc-12-dev)"
LIBTSAN="$(readlink -f "$LIBTSAN")"
command -v setarch >/dev/null || die "setarch not found (util-linux)"
FTPY="$(bash "$ROOT/tools/free-threaded-python.sh")"
say "interpreter: $FTPY; runtime: $LIBTSAN"

# -- 2. the venv ---------------------------------------------------------------------------
PY="$VENV/bin/python"
if [[ ! -x "$PY" ]]; then
    say "creating $VENV"
    "$FTPY" -m venv "$VENV"
fi
if [[ ! -e "$VENV/.deps-installed" ]]; then
    "$PY" -m pip install -q "setuptools>=77" "Cython>=3.1,<4" wheel \
        "pytest>=7" "pytest-timeout>=2.1" "hypothesis>=6,<6.140"
    touch "$VENV/.deps-installed"
fi

# -- 3. the instrumented build -------------------------------------------------------------
# From a copy of the tree: setuptools reuses object files in build/ by timestamp, whatever
# flags produced them.
STAGE="$(mktemp -d "${TMPDIR:-/tmp}/cppnp-tsan.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
tar -C "$ROOT" -cf - --exclude='*.so' --exclude='*.o' --exclude='src/_core/*.c' \
    --exclude='*.html' --exclude=__pycache__ --exclude='*.egg-info' \
    setup.py pyproject.toml README.md src \
    | tar -C "$STAGE" -xf -
say "building with -fsanitize=thread in $STAGE"
(
    cd "$STAGE"
    # -O1 after setup.py's -O2 would not win (extra_compile_args come last): the build is
    # -O2 with frame pointers, which TSan handles; -g keeps .pyx line numbers in reports.
    export CFLAGS="-fsanitize=thread -g -fno-omit-frame-pointer"
    export LDFLAGS="-fsanitize=thread"
    export CPPNP_STRICT="${CPPNP_STRICT:-1}"
    "$PY" setup.py -q build_ext -j "$(nproc)" >&2
    "$PY" -m pip install -q --no-build-isolation --force-reinstall --no-deps . >&2
)

"$PY" - <<'EOF'
import glob
import os
import subprocess
import sys

import _core

so = sorted(glob.glob(os.path.join(os.path.dirname(_core.__file__), "*.so")))
bad = [p for p in so
       if "__tsan_" not in subprocess.run(["nm", "-D", "--undefined-only", p],
                                          capture_output=True, text=True, check=True).stdout]
if not so or bad:
    sys.exit("[tsan] not instrumented: %s" % (bad or "no extension found"))
if sys._is_gil_enabled():
    sys.exit("[tsan] importing _core enabled the GIL")
print("[tsan] %d extensions instrumented" % len(so), file=sys.stderr)
EOF

# -- 4. the run ----------------------------------------------------------------------------
rm -rf "$LOGDIR"
mkdir -p "$LOGDIR"
# halt_on_error=0: collect every report of the run (the verdict is below).
# report_signal_unsafe=0: Python's signal handlers run in the main loop, not in the handler.
# history_size=4: enough history to show both stacks of a race in the tests' long threads.
export TSAN_OPTIONS="halt_on_error=0:report_signal_unsafe=0:second_deadlock_stack=1:\
history_size=4:suppressions=$SUPP:log_path=$LOGDIR/tsan"
export PYTHON_GIL=0
export PYTHONFAULTHANDLER=1
export CPPNP_SANITIZED=1
unset PYTHONPATH

if (( $# )); then
    args=("$@")
else
    read -r -a args <<<"${TSAN_TESTS:-$DEFAULT_TESTS}"
fi
say "running pytest under TSan: ${args[*]} (reports -> $LOGDIR)"
start=$SECONDS
set +e
# shellcheck disable=SC2086
(cd tests && LD_PRELOAD="$LIBTSAN${LD_PRELOAD:+ $LD_PRELOAD}" setarch "$(uname -m)" -R \
    "$PY" -m pytest -q -p no:cacheprovider --timeout 600 ${PYTEST_ARGS:-} "${args[@]}")
rc=$?
set -e
say "pytest exit status $rc after $((SECONDS - start)) s"

# -- 5. the verdict ------------------------------------------------------------------------
"$PY" - "$LOGDIR" <<'EOF' || rc=1
import collections
import glob
import re
import sys

OURS = re.compile(r"/_core/|\.pyx:|__pyx_")
reports = []
for path in sorted(glob.glob(sys.argv[1] + "/tsan.*")):
    text = open(path, errors="replace").read()
    for chunk in re.split(r"(?m)^==================\n", text):
        if "WARNING: ThreadSanitizer:" in chunk or "ERROR: ThreadSanitizer:" in chunk:
            reports.append((path, chunk.strip()))
if not reports:
    print("[tsan] OK: no report", file=sys.stderr)
    sys.exit(0)


def frames(chunk):
    return re.findall(r"^\s+#\d+ (\S+) (\S+)", chunk, re.M)


def key(chunk):
    """The first frame of ours in each stack: the race's identity."""
    out = []
    for stack in re.split(r"\n\s*\n", chunk):
        for fn, where in frames(stack):
            if OURS.search(fn) or OURS.search(where):
                out.append("%s %s" % (fn, where.rsplit("/", 1)[-1]))
                break
    return tuple(out)


ours = collections.OrderedDict()
other = []
for path, chunk in reports:
    if OURS.search(chunk):
        ours.setdefault(key(chunk), []).append((path, chunk))
    else:
        other.append((path, chunk))
print("[tsan] %d report(s): %d distinct in cppnp's code, %d elsewhere"
      % (len(reports), len(ours), len(other)), file=sys.stderr)
for k, items in ours.items():
    print("==== OURS (%d report(s)): %s" % (len(items), " <-> ".join(k)), file=sys.stderr)
    print(items[0][1], file=sys.stderr)
for path, chunk in other[:10]:
    print("==== NOT OURS (%s): add a commented suppression only if every frame is inside "
          "CPython" % path, file=sys.stderr)
    print(chunk, file=sys.stderr)
sys.exit(1)
EOF
if (( rc != 0 )); then
    say "FAILED"
else
    say "OK: tests passed, no ThreadSanitizer report"
fi
exit "$rc"
