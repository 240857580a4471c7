"""Not a benchmark: bench/gpu_check.py's evaluation sections, each on every visible GPU against one (in
quick mode, on the CPU: two processes, a tiny model spread over the CPU and disk, the vLLM stand-in)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from bench.eval_data_parallel import evaluate
from bench.eval_vllm import compare, has_vllm, saved_tiny_model, stand_in_engine


def data_parallel_evaluation(run_dir: Path, quick: bool) -> dict[str, Any]:
    """evaluate.py on every visible GPU against one (quick: two CPU processes, a tiny model)."""
    devices = 2 if quick else torch.cuda.device_count()
    if devices < 2:
        return {"skipped": f"{devices} GPU visible; data-parallel evaluation needs two or more"}
    model, problems = ("tiny_llama", 4) if quick else ("smollm2_135m", 64 * devices)
    one, alone = evaluate(1, problems, 64, run_dir / "one", model)
    many, together = evaluate(devices, problems, 64, run_dir / "many", model)
    return {
        "devices": devices,
        "problems": problems,
        "identical": sum(a == b for a, b in zip(alone, together, strict=True)),
        "seconds_one": round(one, 1),
        "seconds_data_parallel": round(many, 1),
        "ratio": round(one / many, 3),
    }


def sharded_evaluation(run_dir: Path, quick: bool) -> dict[str, Any]:
    """evaluate.py on a model spread over every visible GPU against the same model on one (quick: a saved tiny
    model spread over the CPU and disk)."""
    gpus = torch.cuda.device_count()
    if gpus < 2 and not quick:
        return {"skipped": f"{gpus} GPU visible; spreading a model needs two or more"}
    if quick:
        name, common = "tiny_llama", saved_tiny_model(run_dir / "tiny")
        placement = ("model.device_map=auto", "model.max_memory={cpu: 400KB}")
    else:
        name, common, placement = "smollm2_135m", (), ("model.device_map=balanced",)
    spread = (*common, *placement, f"model.offload_folder={run_dir / 'offload'}")
    problems = 4 if quick else 32
    one, alone = evaluate(1, problems, 64, run_dir / "one", name, common)
    sharded, together = evaluate(1, problems, 64, run_dir / "sharded", name, spread)
    return {
        "devices": "cpu+disk" if quick else gpus,
        "problems": problems,
        "identical": sum(a == b for a, b in zip(alone, together, strict=True)),
        "seconds_one_device": round(one, 1),
        "seconds_sharded": round(sharded, 1),
    }


def vllm_generation(run_dir: Path, quick: bool) -> dict[str, Any]:
    """evaluate.py with generation.backend=vllm against lmlab's own generation (quick: the tests' stand-in
    engine, tests/fixtures/vllm_stand_in, on a saved tiny model)."""
    model, env = ("model=smollm2_135m",), None
    if quick:
        model, env = stand_in_engine(run_dir / "tiny")
    elif not has_vllm(sys.executable):
        return {"skipped": "vLLM is not installed: pip install -e '.[vllm]'"}
    return compare(sys.executable, 4 if quick else 128, 64, 1, run_dir, model, env)
