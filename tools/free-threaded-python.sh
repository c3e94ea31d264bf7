#!/usr/bin/env bash
# Builds a free-threaded CPython 3.13 (3.13t, Py_GIL_DISABLED=1) into PREFIX and prints the path
# of its python. Offline except for one source download: the source is Debian's python3.13
# source package (its upstream tarball is byte-identical to the one pyenv's 3.13.5t definition
# checks), built by pyenv's python-build. The tarball is kept in ~/.cache/cppnp/src, and a
# second call with the same PREFIX returns at once.
#
#   usage: tools/free-threaded-python.sh [--tsan] [PREFIX]
#
#   PREFIX   default ~/.cache/cppnp/python3.13t (about 3 minutes on 2 cores)
#   --tsan   the same interpreter built with ThreadSanitizer (--with-thread-sanitizer), for
#            scripts/tsan.sh; default PREFIX ~/.cache/cppnp/python3.13t-tsan (about 8 minutes)
#
# Needs pyenv's python-build (on PATH or in ~/.pyenv), apt-get with a Debian mirror configured
# (only when the tarball is not cached yet), and CPython's build dependencies (gcc, make,
# libssl-dev, zlib1g-dev, libffi-dev, ...). CPPNP_FT_PYTHON=/path/to/python3.13t skips the
# build and uses that interpreter (it must be a free-threaded build; not with --tsan).
set -euo pipefail
TSAN=0
if [ "${1:-}" = "--tsan" ]; then TSAN=1; shift; fi
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/cppnp
if [ "$TSAN" = 1 ]; then
    PREFIX=${1:-$CACHE/python3.13t-tsan}
else
    PREFIX=${1:-$CACHE/python3.13t}
fi
PY="$PREFIX/bin/python3.13t"

# A TSan-built interpreter needs address-space randomisation off to start on this kernel, and
# must not report CPython's own known races while we only ask it questions.
run_py() {
    if [ "$TSAN" = 1 ]; then
        TSAN_OPTIONS="report_bugs=0:exitcode=0" setarch "$(uname -m)" -R "$@"
    else
        "$@"
    fi
}
CHECK='import sys, sysconfig
tsan = "--with-thread-sanitizer" in (sysconfig.get_config_var("CONFIG_ARGS") or "")
sys.exit(sys._is_gil_enabled() or tsan != bool(int(sys.argv[1])))'

if [ "$TSAN" = 0 ] && [ -n "${CPPNP_FT_PYTHON:-}" ]; then
    "$CPPNP_FT_PYTHON" -c "$CHECK" 0 \
        || { echo "CPPNP_FT_PYTHON=$CPPNP_FT_PYTHON is not a free-threaded python" >&2; exit 1; }
    echo "$CPPNP_FT_PYTHON"; exit 0
fi
if [ -x "$PY" ] && run_py "$PY" -c "$CHECK" "$TSAN" 2>/dev/null; then
    echo "$PY"; exit 0
fi
build=$(command -v python-build || true)
[ -n "$build" ] || build="$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")/plugins/python-build/bin/python-build"
[ -x "$build" ] || { echo "pyenv's python-build not found" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$CACHE/src" "$work/cache"
tarball="$CACHE/src/Python-3.13.5.tar.xz"
if [ ! -s "$tarball" ]; then
    # A private apt configuration (the host's apt state is left alone) with trixie's source
    # index, from the same mirror the host already uses.
    uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$uri" ] || uri=$(awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' /etc/apt/sources.list)
    [ -n "$uri" ] || { echo "no Debian mirror configured" >&2; exit 1; }
    mkdir -p "$work/apt/lists/partial" "$work/apt/cache/archives/partial" "$work/src"
    touch "$work/apt/status"
    echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri trixie main" >"$work/apt/sources.list"
    O=(-o "Dir::Etc::sourcelist=$work/apt/sources.list" -o "Dir::Etc::sourceparts=/nonexistent"
       -o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache=$work/apt/cache" -o "Dir::State::status=$work/apt/status")
    apt-get "${O[@]}" -qq update >&2
    (cd "$work/src" && apt-get "${O[@]}" -qq source --download-only python3.13 >&2)
    orig=$(ls "$work/src"/python3.13_3.13.5.orig.tar.xz 2>/dev/null || true)
    [ -n "$orig" ] || { echo "trixie's python3.13 is no longer 3.13.5: found $(ls "$work/src")" >&2; exit 1; }
    cp "$orig" "$tarball.tmp" && mv "$tarball.tmp" "$tarball"
fi
cp "$tarball" "$work/cache/Python-3.13.5.tar.xz"
if [ "$TSAN" = 1 ]; then
    # The freshly built interpreter runs during the build (sharedmods, ensurepip): it needs
    # ASLR off, and must neither print nor fail on CPython's own (suppressed upstream) races.
    # CPython's own test suite is left out (--disable-test-modules): byte-compiling it with an
    # instrumented interpreter takes longer than the whole build.
    TSAN_OPTIONS="report_bugs=0:exitcode=0" \
        PYTHON_CONFIGURE_OPTS="--with-thread-sanitizer --disable-test-modules" \
        PYTHON_MAKE_INSTALL_OPTS="COMPILEALL_OPTS=-j0" \
        PYTHON_BUILD_CACHE_PATH="$work/cache" MAKE_OPTS="-j$(nproc)" \
        setarch "$(uname -m)" -R "$build" 3.13.5t "$PREFIX" >&2
else
    PYTHON_BUILD_CACHE_PATH="$work/cache" MAKE_OPTS="-j$(nproc)" "$build" 3.13.5t "$PREFIX" >&2
fi
run_py "$PY" -c "$CHECK" "$TSAN" || { echo "$PY: not the interpreter asked for" >&2; exit 1; }
echo "$PY"
