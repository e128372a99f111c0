# Quickstart (SPEC §4): `make demo`, `make test`, `make down`. Needs only Python 3.11+ and make.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)
# demo and tests run on the local stack even when .env points at production
LOCAL  := LMNH_STACK=local

.PHONY: help install up status down demo test lint report bench clean

help:
	@echo "make demo    set up, start the local stack, load sample data, consume a simulated stream"
	@echo "make test    set up and run every test (starts the local stack it needs)"
	@echo "make down    stop the local stack"
	@echo "make up | status | lint | clean"

$(STAMP): requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed, found " + sys.version.split()[0])'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@rm -f $(VENV)/.installed-*
	@touch $@

# The product's modules compiled once here: the systemd units cannot write __pycache__
# (ProtectSystem=strict), and without it every run compiles them again (~35 ms of start-up).
install: $(STAMP)
	@$(PY) -m compileall -q $(wildcard *.py)

up: install
	$(LOCAL) $(PY) localstack.py up

status:
	@if [ -x $(PY) ]; then $(PY) localstack.py status; else echo "nothing installed yet"; fi

down:
	@if [ -x $(PY) ]; then $(PY) localstack.py down; else echo "nothing to stop"; fi

demo: install
	$(LOCAL) $(PY) localstack.py up
	$(LOCAL) bash reset.sh -y schema.sql
	$(LOCAL) $(PY) sample_data.py --objects 4 --rows 5000
	$(LOCAL) $(PY) pipeline.py --no-progress
	$(LOCAL) $(PY) simulator.py --count 3000
	$(LOCAL) $(PY) consumer.py --stop-at-end
	$(LOCAL) bash connect.sh -X -c "SELECT * FROM load_overview"

test: install
	$(LOCAL) $(PY) -m pytest

lint: install
	$(PY) -m ruff check .
	bash ops/check.sh

# the analysis notebook, executed on the configured database (.env, or the local one), as one
# self-contained HTML page with its charts embedded
report: install
	$(PY) -m nbconvert --execute --to html --no-input --output-dir report --output analysis \
		--ExecutePreprocessor.timeout=600 \
		--TagRemovePreprocessor.remove_cell_tags='["remove-cell"]' analysis.ipynb

# benchmarks on the local stack (bench/README.md): each figure a ratio against a limit measured
# in the same run, the sides interleaved; batch at 1M and 5M rows (best of 3), stream at 1M
# messages (best of 2) with the latency run; takes 2-5 minutes
bench: install
	$(LOCAL) $(PY) bench/batch.py --rows 1000000 --repeat 3 --baseline-rounds 1
	$(LOCAL) $(PY) bench/batch.py --rows 5000000 --repeat 3 --skip-baseline
	$(LOCAL) $(PY) bench/stream.py --messages 1000000 --repeat 2

clean: down
	rm -rf $(VENV) .local logs report
