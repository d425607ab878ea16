# Every target bootstraps .venv itself, so a fresh clone needs nothing but Python 3.11.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(INSTALLED)

# setup.py gives the compatible ranges, constraints.txt the exact tested versions within them.
$(INSTALLED): setup.py constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(INSTALLED)

# Generate the synthetic data, train PYLON and its ResNet baseline, evaluate both side by side.
demo: $(INSTALLED)
	$(PY) tools/make_demo.py --out datasets/demo
	$(PY) train.py --config demo.yaml
	$(PY) evaluate.py --localization
	$(PY) train.py --config demo_baseline.yaml
	$(PY) evaluate.py --localization

# Lint first (rules in pyproject.toml): a lint error fails the target before any test runs.
test: $(INSTALLED)
	$(PY) -m ruff check .
	$(PY) -m pytest -n 2 -q

# loader_speed.py reads the demo data.
bench: $(INSTALLED)
	$(PY) tools/make_demo.py --out datasets/demo
	$(PY) bench/model_speed.py
	$(PY) bench/loader_speed.py
	$(PY) bench/heatmap_speed.py

clean:
	rm -rf $(VENV) runs datasets/demo datasets/cache
