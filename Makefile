# The README's commands: `make test` and `make demo` (its first screen), `make study`, `make study-run`, `make figures`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?=

.PHONY: test demo study study-run figures install

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[dev,offline-fid]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# Trains a small CLTS+MDLRC model on the built-in synthetic data (or DATA=path/to/cifar10) on CPU.
demo: $(STAMP)
	$(PY) scripts/demo.py $(if $(DATA),--data_dir $(DATA),)

# The small-scale CPU study (docs/study.md). `make study` trains nothing: it reprints every table
# and redraws every figure of both scales (experiments/study/report.py: PAGE_SCALES) from the committed
# results in docs/study/ledger, and rewrites docs/study.md's generated sections. `make study-run
# ARMS=sigma SEEDS=1,2` trains what is not committed yet (resumable; finished runs land in the
# ledger at once). SOURCE=cifar-10-python.tar.gz (default: ../shared's CIFAR-10 JPEG zip).
SOURCE ?=
ARMS ?= first
SEEDS ?=
study: $(STAMP)
	$(PY) scripts/study.py --summary_only True
	$(PY) scripts/study.py --scale cpu_long --arms long --summary_only True
study-run: $(STAMP)
	$(PY) scripts/study.py --arms $(ARMS) $(if $(SEEDS),--seeds $(SEEDS),) $(if $(SOURCE),--source $(SOURCE),)

# The consistency phenomenon measured (docs/figures.md, "Measured here"): trains the models it needs at the
# CPU study's scale (reusing the study's finished baseline runs), runs Table 1 and Figs. 1-4 into docs/figures/
# and regenerates the doc's section; resumable, and on a clone with the committed results it only reprints.
figures: $(STAMP)
	$(PY) scripts/figures.py $(if $(SOURCE),--source $(SOURCE),)
