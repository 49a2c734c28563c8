# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Nothing is written outside this checkout: Airflow's home is .airflow/ (git-ignored).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
# The dependency files: a change to any of them re-runs the install (dev set, exact versions, then the
# FullStory provider itself: pyproject.toml, so Airflow finds the `fullstory` connection type).
DEPS := requirements.txt requirements-dev.txt constraints.txt pyproject.toml
STAMP := $(VENV)/.installed-$(shell cat $(DEPS) | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

export AIRFLOW_HOME := $(CURDIR)/.airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN := sqlite:///$(CURDIR)/.airflow/airflow.db
export PYTHONPATH := $(CURDIR):$(CURDIR)/plugins

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

$(STAMP): $(DEPS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt -c constraints.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

demo: venv
	$(PY) scripts/demo.py

test: venv
	@c="$${CHROMIUM:-$$(command -v chromium || echo /usr/bin/chromium)}"; if [ -f "$$c" ] && [ -x "$$c" ]; then :; \
	else echo "make test: Chromium is not installed, so the run report's browser test (tests/report/test_report_browser.py) is skipped. Install it with 'apt-get install -y chromium' (as root), or set CHROMIUM to a Chromium binary."; fi
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: venv
	$(PY) bench/run_all.py

clean:
	rm -rf .airflow state bench/out
