"""`generation.backend=vllm` (evaluation/vllm_backend.py), run against a stand-in for vLLM's offline API
(tests/fixtures/vllm_stand_in: transformers underneath, every request logged) because vLLM does not install
beside lmlab's torch and transformers here: what lmlab hands the engine (weights, revision, dtype, parallel
sizes, seed, prompt token ids, stop strings, LoRA adapter) and what it makes of the answers (the same
predictions and scores as its own generation). `make gpu-check` runs the real engine against lmlab's own
where vLLM is installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import open_dict

from evaluation import evaluate, vllm_backend
from runtime import saved_run
from runtime.training import run as train
from runtime.validate import ConfigError, check
from tests.conftest import TINY, built_model, compose_config


def evaluated(run_dir: Path, *overrides: str) -> list[dict]:
    cfg = compose_config(
        "task.source=bundled", "print_config=false", "limit=5", *overrides, config_name="evaluate"
    )
    with open_dict(cfg):
        cfg.paths.output_dir, cfg.paths.cache_dir = str(run_dir), str(run_dir.parent / "cache")
    evaluate.run(cfg)
    return [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]


def requests(log: Path) -> list[dict]:
    """The engines and requests the stand-in logged (not its answers)."""
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    return [entry for entry in entries if "completions" not in entry]


def test_vllm_predictions_equal_lmlab_and_the_engine_gets_lmlab_inputs(
    saved_llama: Path, stand_in: Path, tmp_path: Path
) -> None:
    model = ["model=tiny_llama", f"model.path={saved_llama}", "model.architecture=null", "task=gsm8k"]
    short = ["generation.max_new_tokens=12", "generation.stop_strings=[' a']"]
    own = evaluated(tmp_path / "lmlab", *model, *short)
    served = evaluated(
        tmp_path / "vllm", *model, *short, "generation.backend=vllm", "generation.vllm.tensor_parallel_size=2"
    )
    assert [r["generation"] for r in served] == [r["generation"] for r in own]
    assert [r["exact_match_flexible"] for r in served] == [r["exact_match_flexible"] for r in own]
    assert any(r["generation"] for r in own)  # something was generated and cut
    engine, asked = requests(stand_in)
    assert engine["engine"] == {
        "model": str(saved_llama),
        "revision": None,
        "seed": 42,
        "trust_remote_code": False,
        "tensor_parallel_size": 2,
        "pipeline_parallel_size": 1,
        "gpu_memory_utilization": 0.9,
        "dtype": "float32",
    }
    _, _, tokenizer = built_model(*model[:3])
    assert asked["prompt_token_ids"] == [tokenizer(r["prompt"])["input_ids"] for r in own]
    stops = asked["params"][0]["stop"]
    assert (
        " a" in stops and asked["params"][0]["temperature"] == 0.0 and asked["params"][0]["max_tokens"] == 12
    )
    assert asked["lora"] is None


def test_a_lora_run_is_served_as_an_adapter_on_its_base(
    saved_llama: Path, stand_in: Path, tmp_path: Path, tiny_config
) -> None:
    base = ["model=tiny_llama", f"model.path={saved_llama}", "model.architecture=null"]
    # a learning rate large enough that three steps change the greedy outputs
    cfg = tiny_config(*base, "task=gsm8k", "method=lora", "trainer.max_steps=3", "optim.lr=0.05")
    run_dir = Path(train(cfg)["run_dir"])
    short = [f"ckpt={run_dir}", "task=gsm8k", "generation.max_new_tokens=10"]
    own = evaluated(tmp_path / "lmlab", *short)
    served = evaluated(tmp_path / "vllm", *short, "generation.backend=vllm")
    zero_shot = evaluated(tmp_path / "base", *base, "task=gsm8k", "generation.max_new_tokens=10")
    assert [r["generation"] for r in served] == [r["generation"] for r in own]
    assert [r["generation"] for r in own] != [r["generation"] for r in zero_shot]  # the adapter mattered
    engine, asked = requests(stand_in)
    assert engine["engine"]["model"] == str(saved_llama)
    assert engine["engine"]["enable_lora"] is True and engine["engine"]["max_lora_rank"] == 8
    assert asked["lora"] == str(run_dir / "final")


def test_sampled_completions_ask_for_n_per_prompt_with_a_seed_each(
    saved_llama: Path, stand_in: Path, tmp_path: Path
) -> None:
    rows = evaluated(
        tmp_path / "run",
        "model=tiny_llama",
        f"model.path={saved_llama}",
        "model.architecture=null",
        "task=gsm8k",
        "generation.backend=vllm",
        "generation.do_sample=true",
        "generation.num_samples=3",
        "generation.max_new_tokens=6",
        "seed=7",
    )
    _, asked = requests(stand_in)
    assert [p["n"] for p in asked["params"]] == [3] * len(rows)
    assert [p["seed"] for p in asked["params"]] == [7 + i for i in range(len(rows))]
    assert all(p["temperature"] == 0.7 for p in asked["params"])
    assert all(len(r["generations"]) == 3 and "pass@3_flexible" in r for r in rows)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["task=classification"], "generation.backend=lmlab"),
        (["task=gsm8k", "devices=2"], "tensor_parallel_size"),
        (["task=gsm8k", "model.device_map=auto"], "model.device_map"),
    ],
)
def test_what_vllm_cannot_run_is_refused_by_key(
    saved_llama: Path, stand_in: Path, tmp_path: Path, overrides: list[str], named: str
) -> None:
    model = ["model=tiny_llama", f"model.path={saved_llama}", "model.architecture=null"]
    with pytest.raises(ValueError, match=named):
        evaluated(tmp_path / "run", *model, *overrides, "generation.backend=vllm")


def test_a_fresh_model_or_another_method_is_refused_and_a_missing_vllm_says_how_to_install(
    tmp_path: Path, tiny_config
) -> None:
    with pytest.raises(ValueError, match="model.architecture"):
        evaluated(tmp_path / "fresh", "model=tiny_llama", "task=gsm8k", "generation.backend=vllm")
    cfg = tiny_config("model=tiny_llama", "task=gsm8k", "method=prompt_tuning", "trainer.max_steps=1")
    run_dir = train(cfg)["run_dir"]
    with open_dict(cfg):
        cfg.ckpt = run_dir
    with pytest.raises(ValueError, match="PROMPT_TUNING adapter: vLLM serves LoRA adapters only"):
        vllm_backend.weights(cfg, saved_run.resolve(cfg))
    with pytest.raises(ConfigError, match="generation.backend='beam'"):
        check(compose_config("generation.backend=beam", config_name="evaluate"), "evaluate")
    missing = compose_config(*TINY[:1], "model=tiny_llama", "model.path=x", "model.architecture=null")
    with open_dict(missing):
        missing.generation = {"backend": "vllm"}
        missing.devices = 1
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'lmlab\[vllm\]'"):
        vllm_backend.check(missing, "generation")
