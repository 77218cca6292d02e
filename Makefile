# Set-up is automatic: every target creates .venv and installs the package with its
# dev extras when they are missing (the stamp file records a finished install).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench fuzz clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/issue_12782.py

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check jaxsurgery tests examples benchmarks notebooks
	$(VENV)/bin/ruff format --check jaxsurgery tests examples benchmarks notebooks

bench: $(STAMP)
	$(PY) benchmarks/run.py

fuzz: $(STAMP)
	JS_FUZZ_EXAMPLES=5000 $(PY) -m pytest -q tests/test_fuzz.py --hypothesis-show-statistics

clean:
	rm -rf $(VENV) build *.egg-info
