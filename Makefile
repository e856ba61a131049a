# Two commands on a fresh machine:  `make demo` (main job)  and  `make test` (test suite).
# Both create or reuse the virtual environment in $(VENV). torch==2.13.0 is installed first so that
# pip does not pull a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mergelab-installed

.PHONY: demo quickstart mini-demo test install bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The main job: build/reuse a small resnet_s zoo, merge a 4-task group with every method, print the table and
# write ./mergelab-quickstart/report.html (about 5-10 min on 2 cores from an empty cache, seconds when cached).
demo: $(STAMP)
	$(VENV)/bin/mergelab quickstart

quickstart: demo

# The older 30-second demonstration (an MLP on 8x8 digits, data-free methods only).
mini-demo: $(STAMP)
	$(VENV)/bin/mergelab demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/merge_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
