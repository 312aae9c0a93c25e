# The two commands a newcomer runs: `make demo` (a whole alignment job end to end on the embedded
# default) and `make test`. Each installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench-api bench-round clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch, pinned: a looser spec would pull several GB of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[train,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m alignd.demo

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check .

bench-api: install
	$(PY) bench/api.py

bench-round: install
	$(PY) bench/round.py

clean:
	rm -rf $(VENV) var .demo
