#!/usr/bin/env bash
# ASan + UBSan run of the whole test suite.
#
# Builds the Cython core with CPPNP_SANITIZE=1 (-fsanitize=address,undefined -O0 -g3) from a
# fresh copy of the source tree, installs it into its own virtualenv (.venv-asan), and runs
# pytest on tests/ with the sanitizer runtimes preloaded (stock CPython is not built with
# ASan, so libasan must be the first library in the process).
#
# Exits non-zero on a test failure OR on any ASan/UBSan report, including reports from
# subprocesses and forked children that a test might not notice: every report is written
# to $SAN_LOG_DIR (log_path) and the script fails if that directory holds any (except a
# SEGV with no cppnp frame in its stack: tests crash children on purpose).
#
# LeakSanitizer is off (detect_leaks=0): CPython does not free everything at exit, by
# design, so LSan would report the interpreter.  Leaks of cppnp objects are covered by the
# suite's own teardown accounting (live Buffers/connections, fds, threads).
#
# Environment:
#   PYTHON        interpreter to build the venv from (default python3)
#   ASAN_VENV     virtualenv directory (default .venv-asan)
#   SAN_LOG_DIR   where sanitizer reports go (default build/sanitize-logs, wiped first)
#   PYTEST_ARGS   extra pytest options (default none), e.g. "-x --timeout 300"
#   CPPNP_STRICT  -Werror for our own build (default 1, like `make`)
#   CI / CPPNP_APT_INSTALL=1   as root, apt-get install libasan8 libubsan1 if missing
#                 (otherwise a missing runtime is an error with the command to run)
#
# Usage: scripts/sanitize.sh [pytest args]   (default: the whole suite, tests/)
#        e.g. scripts/sanitize.sh test_buffer.py test_fuzz_buffer.py   (paths from tests/)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
VENV="$(realpath -m "${ASAN_VENV:-.venv-asan}")"
LOGDIR="${SAN_LOG_DIR:-$ROOT/build/sanitize-logs}"
export CPPNP_STRICT="${CPPNP_STRICT:-1}"
CC="${CC:-gcc}"

say() { printf '[sanitize] %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 2; }

# -- 1. the sanitizer runtimes ------------------------------------------------------------
# `gcc -print-file-name=X` prints X unchanged when it does not find the library.
runtime() { "$CC" -print-file-name="$1"; }
LIBASAN="$(runtime libasan.so)"
LIBUBSAN="$(runtime libubsan.so)"
if [[ "$LIBASAN" != /* || ! -e "$LIBASAN" || "$LIBUBSAN" != /* || ! -e "$LIBUBSAN" ]]; then
    if [[ "$(id -u)" == 0 && ( -n "${CI:-}" || "${CPPNP_APT_INSTALL:-}" == 1 ) ]] \
            && command -v apt-get >/dev/null; then
        say "installing the ASan/UBSan runtimes (libasan8 libubsan1)"
        apt-get update -q >&2 || true
        apt-get install -y -q libasan8 libubsan1 >&2
        LIBASAN="$(runtime libasan.so)"
        LIBUBSAN="$(runtime libubsan.so)"
    fi
fi
[[ "$LIBASAN" == /* && -e "$LIBASAN" ]] \
    || die "libasan not found ($CC -print-file-name=libasan.so -> $LIBASAN);" \
           "install it: apt-get install libasan8 libubsan1 (gcc 12: with libgcc-12-dev)"
[[ "$LIBUBSAN" == /* && -e "$LIBUBSAN" ]] \
    || die "libubsan not found ($CC -print-file-name=libubsan.so -> $LIBUBSAN);" \
           "install it: apt-get install libubsan1"
LIBASAN="$(readlink -f "$LIBASAN")"
LIBUBSAN="$(readlink -f "$LIBUBSAN")"
say "runtimes: $LIBASAN $LIBUBSAN"

# -- 2. the venv ----------------------------------------------------------------------------
PY="$VENV/bin/python"
if [[ ! -x "$PY" ]]; then
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
fi
"$PY" -m pip install -q "setuptools>=77" "Cython>=3.1,<4" wheel \
    -r "$ROOT/tests/requirements.txt"

# -- 3. the instrumented build ----------------------------------------------------------------
# Built from a copy of the tree: setuptools reuses object files in build/ by timestamp,
# whatever flags produced them, so building in place could link the -O2 objects of a
# normal build into the "sanitized" package.
STAGE="$(mktemp -d "${TMPDIR:-/tmp}/cppnp-asan.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
tar -C "$ROOT" -cf - --exclude='*.so' --exclude='*.o' --exclude='src/_core/*.c' \
    --exclude='*.html' --exclude=__pycache__ --exclude='*.egg-info' \
    setup.py pyproject.toml README.md src \
    | tar -C "$STAGE" -xf -
say "building with CPPNP_SANITIZE=1 in $STAGE"
(
    cd "$STAGE"
    export CPPNP_SANITIZE=1
    "$PY" setup.py -q build_ext -j "$(nproc)" >&2
    "$PY" -m pip install -q --no-build-isolation --force-reinstall --no-deps . >&2
)

# The installed extensions must really be instrumented (and nothing else shadows them).
"$PY" - "$LIBASAN" <<'EOF'
import importlib.util
import subprocess
import sys

# Every extension module of the core, as the source tree lists them (a new module is
# checked without editing this list).
import pathlib
src = pathlib.Path("src/_core")
mods = sorted(p.stem for p in src.glob("*.pyx"))
bad = [] if len(mods) >= 12 else ["only %d .pyx files found in %s" % (len(mods), src)]
for name in mods:
    spec = importlib.util.find_spec("_core." + name)
    path = spec.origin if spec else None
    if not path or "site-packages" not in path:
        bad.append("%s: not installed in the venv (%s)" % (name, path))
        continue
    syms = subprocess.run(["nm", "-D", "--undefined-only", path], capture_output=True,
                          text=True, check=True).stdout
    if "__asan_report" not in syms or "__ubsan_handle" not in syms:
        bad.append("%s: not built with -fsanitize=address,undefined (%s)" % (name, path))
if bad:
    sys.exit("\n".join(bad))
print("[sanitize] all %d extensions instrumented" % len(mods), file=sys.stderr)
EOF

# -- 4. the run ---------------------------------------------------------------------------------
rm -rf "$LOGDIR"
mkdir -p "$LOGDIR"
# detect_leaks=0: CPython does not free everything at exit (interned strings, static types,
#   module state), by design, so LeakSanitizer would report the interpreter, not us.  Leaks
#   of our own objects are covered by the tests' teardown accounting (live_buffers,
#   live_connections, fds, threads).
# allocator_may_return_null=1: a huge allocation returns NULL (-> MemoryError), as with
#   glibc, instead of ASan aborting the process.
# quarantine_size_mb=64 (default 256): freed memory is held back this long to catch
#   use-after-free; 64 MiB still covers every test's churn, and tests that check that a
#   flooded buffer's memory goes back to the OS (RSS) can pass.
# allow_user_segv_handler=0: ASan keeps its SEGV handler even when Python's faulthandler
#   (PYTHONFAULTHANDLER=1, which the tests' children set) installs its own.  Otherwise
#   faulthandler takes the SEGV first and chains to ASan on its own small alternate stack,
#   where ASan fails ("nested bug in the same thread") and exits 1 with no stack trace:
#   a crash then looks like an exit, and the report loses its frames.  faulthandler still
#   prints the Python traceback on the SIGABRT that follows ASan's report.
# log_path: one file per reporting process; subprocess / fork reports are not lost.
# PYTHONMALLOC=malloc: pymalloc's arenas would hide overflows of Python objects from ASan.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:allocator_may_return_null=1:\
quarantine_size_mb=64:strict_string_checks=1:check_initialization_order=1:detect_stack_use_after_return=0:\
handle_segv=1:allow_user_segv_handler=0:print_summary=1:log_path=$LOGDIR/asan"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:abort_on_error=1:\
log_path=$LOGDIR/ubsan"
export PYTHONMALLOC=malloc
export PYTHONFAULTHANDLER=1
export CPPNP_SANITIZED=1      # tests may read this to adapt (none needs to today)
unset PYTHONPATH

say "running pytest under ASan/UBSan (reports -> $LOGDIR)"
start=$SECONDS
set +e
# shellcheck disable=SC2086
(cd tests && LD_PRELOAD="$LIBASAN $LIBUBSAN${LD_PRELOAD:+ $LD_PRELOAD}" \
    "$PY" -m pytest -q -p no:cacheprovider --ignore=test_sourcecode.py ${PYTEST_ARGS:-} "${@:-.}")
rc=$?
set -e
say "pytest exit status $rc after $((SECONDS - start)) s"

shopt -s nullglob
# Every report fails the run, except a SEGV whose stack has no frame of ours (no _core /
# Cython function): some tests crash a child on purpose (e.g. ctypes.string_at(0), to
# check that a harness tells a crash from an exception); ASan reports those too.
reports=()
for f in "$LOGDIR"/asan.* "$LOGDIR"/ubsan.*; do
    if grep -qE 'Sanitizer: SEGV|Sanitizer:DEADLYSIGNAL' "$f" \
            && ! grep -qE '_core[/.]|__pyx_' "$f"; then
        say "ignored (a crash outside cppnp's code, as tests provoke on purpose): $f"
        grep -m1 -E 'ERROR: .*Sanitizer' "$f" >&2 || true
        continue
    fi
    reports+=("$f")
done
if (( ${#reports[@]} )); then
    say "${#reports[@]} sanitizer report(s):"
    for f in "${reports[@]}"; do
        printf '==== %s\n' "$f" >&2
        cat "$f" >&2
    done
    (( rc != 0 )) || rc=1
fi
if (( rc != 0 )); then
    say "FAILED"
else
    say "OK: suite passed, no ASan/UBSan report"
fi
exit "$rc"
