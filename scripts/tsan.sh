#!/usr/bin/env bash
# ThreadSanitizer run of the thread-heavy tests on free-threaded CPython 3.13t, GIL off.
#
# The interpreter is a 3.13t built with --with-thread-sanitizer by
# `tools/free-threaded-python.sh --tsan` (once, about 8 minutes; cached under ~/.cache/cppnp).
# It has to be instrumented too: with a stock 3.13t, TSan cannot see the synchronisation
# done inside CPython (PyMutex's slow path, which cython.pymutex uses under contention;
# threading.Lock/Event; biased reference counting handing an object to its owner thread to
# free), and reports every hand-off between threads as a race, in our frames too.  Our
# extensions are built with -fsanitize=thread from a fresh copy of the source tree into
# their own virtualenv (.venv-tsan); pytest runs with PYTHON_GIL=0 and address-space
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
#   TSAN_CYTHON_PYTHON  a fast interpreter with Cython to translate the .pyx files
#                  (default .venv/bin/python, as `make install` leaves it; optional)
#   PYTEST_ARGS    extra pytest options (default none)
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
DEFAULT_TESTS="test_thread_pool.py test_handoff.py test_faults_threads.py test_lifetime.py test_stress.py \
test_io_threads.py \
test_tcp_connection.py test_event_loop.py"

say() { printf '[tsan] %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 2; }

# -- 1. runtime and interpreter ------------------------------------------------------------
LIBTSAN="$("$CC" -print-file-name=libtsan.so)"
[[ "$LIBTSAN" == /* && -e "$LIBTSAN" ]] \
    || die "libtsan not found ($CC -print-file-name=libtsan.so -> $LIBTSAN);" \
           "install it: apt-get install libtsan2 (gcc 12: with libgcc-12-dev)"
command -v setarch >/dev/null || die "setarch not found (util-linux)"
FTPY="$(bash "$ROOT/tools/free-threaded-python.sh" --tsan)"
say "interpreter: $FTPY"
NOASLR=(setarch "$(uname -m)" -R)
# Set-up steps (venv, pip, build) run quietly: CPython's own races are not our business.
quiet() { TSAN_OPTIONS="report_bugs=0:exitcode=0" "${NOASLR[@]}" "$@"; }

# -- 2. the venv ---------------------------------------------------------------------------
PY="$VENV/bin/python"
# A venv made from another interpreter (e.g. a stock 3.13t) is rebuilt.
if [[ -e "$VENV/pyvenv.cfg" ]] && ! grep -qx "home = $(dirname "$FTPY")" "$VENV/pyvenv.cfg"; then
    rm -rf "$VENV"
fi
if [[ ! -x "$PY" ]]; then
    say "creating $VENV"
    quiet "$FTPY" -m venv "$VENV"
fi
if [[ ! -e "$VENV/.deps-installed" ]]; then
    quiet "$PY" -m pip install -q "setuptools>=77" "Cython>=3.1,<4" wheel \
        "pytest>=7" "pytest-timeout>=2.1" "hypothesis>=6,<6.140"
    touch "$VENV/.deps-installed"
fi

# -- 3. the instrumented build -------------------------------------------------------------
# In a copy of the tree kept for TSan builds only (build/tsan-stage: its object files were
# all made with the flags below, so an unchanged source is not recompiled next time), built
# in place and put on the venv's path with a .pth file: installing with pip on the
# instrumented interpreter would take longer than the build.
STAGE="$ROOT/build/tsan-stage"
mkdir -p "$STAGE"
rm -rf "$STAGE/src/cppnp"          # modules that moved or went away must not linger
tar -C "$ROOT" -cf - --exclude='*.so' --exclude='*.o' --exclude='src/_core/*.c' \
    --exclude='*.html' --exclude=__pycache__ --exclude='*.egg-info' \
    setup.py pyproject.toml README.md src \
    | tar -C "$STAGE" -xf -
say "building with -fsanitize=thread in $STAGE"
(
    cd "$STAGE"
    # Cython's output is the same C for every CPython (versions are #if'd in it), and
    # running Cython itself on the instrumented interpreter is several times slower: let an
    # ordinary interpreter with Cython translate (setup.py cythonizes when it is loaded),
    # then the TSan interpreter finds the .c files up to date and only compiles them.
    host="${TSAN_CYTHON_PYTHON:-$ROOT/.venv/bin/python}"
    if [[ -x "$host" ]] && "$host" -c "import Cython, setuptools" 2>/dev/null; then
        "$host" setup.py -q --name >/dev/null
    fi
    # -O1 after setup.py's -O2 would not win (extra_compile_args come last): the build is
    # -O2 with frame pointers, which TSan handles; -g keeps .pyx line numbers in reports.
    export CFLAGS="-fsanitize=thread -g -fno-omit-frame-pointer"
    export LDFLAGS="-fsanitize=thread"
    export CPPNP_STRICT="${CPPNP_STRICT:-1}"
    quiet "$PY" setup.py -q build_ext --inplace -j "$(nproc)" >&2
)
SITE="$(quiet "$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
rm -rf "$SITE"/cppnp "$SITE"/_core "$SITE"/cppnp-*.dist-info    # an older pip install
echo "$STAGE/src" >"$SITE/cppnp_tsan_stage.pth"

(cd / && STAGE="$STAGE" quiet "$PY" - <<'EOF'
import glob
import os
import subprocess
import sys

import _core

import cppnp

if not cppnp.__file__.startswith(os.environ["STAGE"]):
    sys.exit("[tsan] cppnp comes from %s, not the TSan build" % cppnp.__file__)
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
)

# -- 4. the run ----------------------------------------------------------------------------
rm -rf "$LOGDIR"
mkdir -p "$LOGDIR/c"
# The generated C, to turn a report's .c lines into .pyx lines (the verdict below).
cp "$STAGE"/build/cython/src/_core/*.c "$LOGDIR/c/"
# halt_on_error=0, exitcode=0: collect every report of the run; the verdict is below, from
#   the logs (a report in a subprocess counts too).
# report_signal_unsafe=0: Python's signal handlers run in the main loop, not in the handler.
# history_size=4: enough history to show both stacks of a race in the tests' long threads.
export TSAN_OPTIONS="halt_on_error=0:exitcode=0:report_signal_unsafe=0:second_deadlock_stack=1:\
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
(cd tests && "${NOASLR[@]}" "$PY" -m pytest -q -p no:cacheprovider --timeout 600 \
    ${PYTEST_ARGS:-} "${args[@]}")
rc=$?
set -e
say "pytest exit status $rc after $((SECONDS - start)) s"

# -- 5. the verdict ------------------------------------------------------------------------
python3 - "$LOGDIR" <<'EOF' || rc=1
import collections
import glob
import re
import sys

# A frame of ours: a _core extension (its .c, its .pyx line, or its .so) or a Cython function.
OURS = re.compile(r"/_core/|\.pyx:|__pyx_|_core\.\S*\.so")
PYX_MARK = re.compile(r'^\s*/\* "(?:\S*/)?(\w+\.(?:pyx|pxd|pxi))":(\d+)')
pyx_cache = {}


def pyx_line(c_file, line):
    """'event_loop.pyx:207' for a line of the generated C (Cython's source comments)."""
    name = c_file.rsplit("/", 1)[-1]
    if name not in pyx_cache:
        try:
            with open("%s/c/%s" % (sys.argv[1], name)) as f:
                pyx_cache[name] = f.read().splitlines()
        except OSError:
            pyx_cache[name] = []
    for text in reversed(pyx_cache[name][:line]):
        m = PYX_MARK.match(text)
        if m:
            return "%s:%s" % m.groups()
    return None


def annotate(chunk):
    """Append the .pyx line to every frame in a generated .c file."""
    def sub(m):
        where = pyx_line(m.group(1), int(m.group(2)))
        return m.group(0) + ("  [%s]" % where if where else "")
    return re.sub(r"(\S+/_core/\w+\.c):(\d+)", sub, chunk)


reports = []
for path in sorted(glob.glob(sys.argv[1] + "/tsan.*")):
    text = open(path, errors="replace").read()
    for chunk in re.split(r"(?m)^==================\n", text):
        if re.search(r"(WARNING|ERROR): ThreadSanitizer:", chunk):
            reports.append((path, annotate(chunk.strip())))
if not reports:
    print("[tsan] OK: no report", file=sys.stderr)
    sys.exit(0)


def access_stacks(chunk):
    """The stacks of the racing accesses (and the headline one), not where threads,
    mutexes or heap blocks were created: those name our code in almost every report."""
    out = []
    for section in re.split(r"\n\s*\n", chunk):
        head = section.strip().splitlines()[0] if section.strip() else ""
        if re.match(r"(Thread T\d+|Mutex M\d+|Location is)", head.strip()):
            continue
        out.append(section)
    return out


def first_ours(section):
    """The first frame of ours in an access stack, skipping Cython's utility functions
    (__Pyx_*: conversions and calls that any of our lines may use)."""
    for line in section.splitlines():
        m = re.match(r"\s+#\d+ (\S+) (\S+)", line)
        if m and m.group(1).startswith("__Pyx_"):
            continue
        if m and (OURS.search(m.group(1)) or OURS.search(m.group(2))):
            pyx = re.search(r"\[(\w+\.(?:pyx|pxd|pxi):\d+)\]", line)
            return pyx.group(1) if pyx else "%s %s" % (m.group(1), m.group(2).rsplit("/", 1)[-1])
    return None


ours = collections.OrderedDict()
other = []
for path, chunk in reports:
    keys = [k for k in map(first_ours, access_stacks(chunk)) if k]
    if keys:
        ours.setdefault(tuple(sorted(set(keys))), []).append((path, chunk))  # A<->B == B<->A
    else:
        other.append((path, chunk))
print("[tsan] %d report(s): %d distinct with a frame in cppnp's code, %d elsewhere"
      % (len(reports), len(ours), len(other)), file=sys.stderr)
for k, items in ours.items():
    print("==== OURS (%d report(s)): %s" % (len(items), "  <->  ".join(k)), file=sys.stderr)
    print(items[0][1], file=sys.stderr)
seen = set()
for path, chunk in other:
    summary = re.search(r"SUMMARY: ThreadSanitizer: (.*)", chunk)
    key = summary.group(1) if summary else chunk[:200]
    if key in seen:
        continue
    seen.add(key)
    print("==== NOT OURS (%s): if every frame is inside CPython, suppress it in "
          "scripts/tsan.supp with a comment saying why" % path, file=sys.stderr)
    print(chunk, file=sys.stderr)
sys.exit(1)
EOF
if (( rc != 0 )); then
    say "FAILED"
else
    say "OK: tests passed, no ThreadSanitizer report"
fi
exit "$rc"
