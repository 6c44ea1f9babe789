# Two commands do all the set-up on a fresh machine:
#   make demo   the whole workflow on the built-in simulated sample; prints where the report is
#   make test   the test suite (what CI runs)
#   make test-fast  the tests that take seconds, for development
# Both create .venv on first use and are fast when it is already up to date.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= 2
PYTEST_ARGS ?=

.PHONY: demo test test-fast setup system-deps lint clean

demo: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --configfile config/config.yaml
	@echo "Report: $(abspath results/demo/report.html)"
	@echo "Summary across samples: $(abspath results/summary.html)"

test: $(STAMP) system-deps
	$(BIN)/pytest $(PYTEST_ARGS)

# The fast tier for developers (README, Developing): no workflow, SLURM or slow test.
test-fast: $(STAMP)
	$(BIN)/pytest -m "not workflow and not slurm and not slow" $(PYTEST_ARGS)

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --editable ".[dev]"
	# papermill runs the report notebooks on this environment's kernel.
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

# Headless Chromium (report screenshot test) and SLURM (integration test; the test starts and stops its own
# one-node cluster), installed with apt-get when root.
system-deps:
	bash scripts/install_chromium.sh || echo "chromium unavailable: the screenshot test will skip"
	bash scripts/slurm_cluster.sh install || echo "SLURM unavailable: the SLURM integration test will skip"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakemake --lint --configfile config/config.yaml

clean:
	rm -rf results logs .snakemake
