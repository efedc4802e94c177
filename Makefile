# `make demo` and `make test` work on a fresh machine: each creates .venv if missing and installs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/retinafm demo --out demo_output --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q

clean:
	rm -rf demo_output .pytest_cache
