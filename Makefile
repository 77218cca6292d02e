# Set-up is automatic: every target creates its venv and installs the package with its
# dev extras when they are missing (a stamp file records a finished install).
# Two environments, the two ends of the supported JAX range:
#   .venv         python3 (3.11 in CI) with the oldest supported JAX, 0.10.x: demo, test, lint, fuzz
#   .venv-latest  Python 3.12 with the newest jax/jaxlib release at install time: test-latest
# test-all and bench use both. A fresh clone (CI) always gets the newest JAX; here,
# `rm -r .venv-latest` (or `make clean`) picks up a newer release.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OLDEST_JAX := 'jax>=0.10,<0.11' 'jaxlib>=0.10,<0.11'

PYTHON_LATEST ?= PYENV_VERSION=3.12.1 python3.12
VENV_LATEST := .venv-latest
PY_LATEST := $(VENV_LATEST)/bin/python
STAMP_LATEST := $(VENV_LATEST)/.installed

.PHONY: demo test test-latest test-all lint bench fuzz clean chromium

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]' $(OLDEST_JAX)
	$(PY) -m pip check
	touch $(STAMP)

$(STAMP_LATEST): pyproject.toml
	@$(PYTHON_LATEST) -c 'import sys; assert sys.version_info >= (3, 12)' || { \
	  echo "error: $(VENV_LATEST) needs Python 3.12, and \`$(PYTHON_LATEST)\` does not run it." >&2; \
	  echo "Install it (pyenv install 3.12.1) or name another: make PYTHON_LATEST=/path/to/python3.12 ..." >&2; \
	  exit 1; }
	test -x $(PY_LATEST) || $(PYTHON_LATEST) -m venv $(VENV_LATEST)
	$(PY_LATEST) -m pip install --quiet --upgrade pip
	$(PY_LATEST) -m pip install --quiet -e '.[dev]'
	$(PY_LATEST) -m pip install --quiet --upgrade jax jaxlib
	$(PY_LATEST) -m pip check
	touch $(STAMP_LATEST)

# prints which Python and JAX a venv runs, before its results
VERSIONS = -c 'import platform, jax, jaxlib; print(f"== Python {platform.python_version()}, jax {jax.__version__}, jaxlib {jaxlib.__version__}")'

demo: $(STAMP)
	$(PY) examples/issue_12782.py

# the real-browser tests of the HTML views (tests/browser.py) drive Debian's chromium: installed
# here when missing (apt-get, with sudo when not root); without it those tests fail, never skip
chromium:
	@test -x "$$JAXSURGERY_CHROMIUM" || command -v chromium >/dev/null 2>&1 || { \
	  echo "chromium is missing (the browser tests of the views need it): apt-get install chromium" >&2; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  command -v chromium >/dev/null 2>&1 || { \
	    echo "error: could not install chromium. Install it (apt-get install chromium) or name one:" >&2; \
	    echo "JAXSURGERY_CHROMIUM=/path/to/chromium make ..." >&2; exit 1; }; }

# each run spreads its tests over TEST_WORKERS processes (pytest-xdist): two, one per core of CI
TEST_WORKERS ?= 2

test: $(STAMP) chromium
	@$(PY) $(VERSIONS)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=12

test-latest: $(STAMP_LATEST) chromium
	@$(PY_LATEST) $(VERSIONS)
	$(PY_LATEST) -m pytest -q -n $(TEST_WORKERS) --durations=12

# both ends of the JAX range (CI runs this): the two venvs are made side by side, then the
# two runs one after the other, each on both cores (side by side, four test processes on two
# cores took ~9 % more CPU time and ~7 % more wall time: four test files, alternated, 144.6
# and 133.2 s against 135.9 and 124.6 s); both run even when one fails, and test-all fails
# when either does
test-all:
	$(MAKE) --jobs=2 $(STAMP) $(STAMP_LATEST) chromium
	$(MAKE) --keep-going test test-latest

lint: $(STAMP)
	$(VENV)/bin/ruff check jaxsurgery tests examples benchmarks notebooks
	$(VENV)/bin/ruff format --check jaxsurgery tests examples benchmarks notebooks

# one section of benchmarks/RESULTS.md per venv, each naming its Python, jax and jaxlib
bench: $(STAMP) $(STAMP_LATEST)
	$(PY) benchmarks/run.py --part oldest-jax
	$(PY_LATEST) benchmarks/run.py --part newest-jax

fuzz: $(STAMP)
	JS_FUZZ_EXAMPLES=5000 $(PY) -m pytest -q tests/test_fuzz.py --hypothesis-show-statistics

clean:
	rm -rf $(VENV) $(VENV_LATEST) build *.egg-info
