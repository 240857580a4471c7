"""GSM8K answer extraction, batched generation, evaluate.py on base and fine-tuned models (its grid:
test_grid.py)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
from omegaconf import open_dict
from peft import PeftModel

from datamodules.gsm8k import extract_flexible, extract_strict, gold_answer
from evaluation import evaluate
from modeling import models
from modeling.generation import generate, truncate_at_stop
from runtime.training import run as train
from stats import sampled
from tests.conftest import compose_config
from tests.helpers import load_saved

ROOT = Path(__file__).resolve().parents[1]

EVAL_TINY = [
    "task.source=bundled",
    "print_config=false",
    "generation.max_new_tokens=8",
    "generation.batch_size=3",
    "limit=5",
]


@pytest.mark.parametrize(
    ("generation", "strict", "flexible"),
    [
        ("She pays 3 * $4 = $12.\n#### 12", "12", "12"),
        ("Total: 1,234 apples.\n#### 1,234", "1234", "1234"),
        ("It costs $1,250.50 in all. The answer is 1,250.50.", "1250.5", "1250.5"),
        ("The balance is -15 dollars.\n#### -15", "-15", "-15"),
        ("First 2.5, then 7.0 kg", None, "7"),
        ("He has 5 pens, buys 3, so 8 pens. Then 8 - 2 = 6", None, "6"),
        ("#### 72.\n\nQuestion: next", "72", "72"),
        ("The price is $18.", None, "18"),
        ("I do not know.", None, None),
        ("#### 3.\n#### 4", "3", "4"),
    ],
)
def test_answer_extraction_follows_lm_evaluation_harness(generation: str, strict, flexible) -> None:
    assert extract_strict(generation) == strict
    assert extract_flexible(generation) == flexible


def test_gold_answer_is_normalised() -> None:
    assert gold_answer("so 1,000 + 5 = 1,005.\n#### 1,005") == "1005"
    assert gold_answer("#### 0.50") == "0.5"


def test_stop_strings_cut_the_completion() -> None:
    assert truncate_at_stop("#### 5\n\nQuestion: more", ["Question:", "\n\nQuestion:"]) == "#### 5"
    assert truncate_at_stop("no stop here", ["Question:"]) == "no stop here"


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
def test_batched_greedy_decoding_equals_one_by_one(name: str) -> None:
    L.seed_everything(0)
    model, tokenizer = models.build(compose_config(f"model={name}").model)
    prompts = [
        "Question: 2+3?\nAnswer:",
        "Q",
        "Question: Tom has 5 apples and buys 7 more. How many?\nAnswer:",
        "Hi there",
    ]
    batched = generate(model, tokenizer, prompts, batch_size=4, max_new_tokens=12)
    alone = [generate(model, tokenizer, [p], batch_size=1, max_new_tokens=12)[0] for p in prompts]
    assert batched == alone
    assert all(len(c[0]) > 0 for c in batched)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
def test_finished_rows_leave_the_batch_and_waiting_prompts_take_their_place(name: str) -> None:
    """Four prompts through two slots: outputs equal `model.generate` one prompt at a time, and the decode
    steps run exactly one row per token still to come (a finished row costs nothing, a free slot is
    refilled)."""
    L.seed_everything(0)
    model, tokenizer = models.build(compose_config(f"model={name}").model)
    prompts = ["Question: 2+3?\nAnswer:", "Tom has 5 apples and buys 7 more. How many?", "Hi there", "Quiet"]
    encoded = [tokenizer(p, return_tensors="pt") for p in prompts]

    def one_by_one() -> list[list[int]]:
        return [
            model.generate(**e, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)[
                0, e["input_ids"].shape[1] :
            ].tolist()
            for e in encoded
        ]

    model.generation_config.eos_token_id = None
    free_running = one_by_one()
    model.generation_config.eos_token_id = free_running[0][3]  # an EOS that ends some rows early, others not
    alone = one_by_one()
    assert len({len(tokens) for tokens in alone}) > 1

    widths = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: widths.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    batched = generate(model, tokenizer, prompts, batch_size=2, max_new_tokens=12)
    hook.remove()
    assert batched == [[tokenizer.decode(tokens, skip_special_tokens=True)] for tokens in alone]
    decode_rows = sum(rows for rows, length in widths if length == 1)
    # the last token of a row is never fed back
    assert decode_rows == sum(len(tokens) - 1 for tokens in alone)
    assert max(rows for rows, _ in widths) == 2


def test_evaluate_writes_predictions_and_metrics(tmp_path: Path) -> None:
    cfg = compose_config(
        "model=tiny_llama",
        "task=gsm8k_sd",
        *EVAL_TINY,
        "generation.num_samples=4",
        "generation.do_sample=true",
        config_name="evaluate",
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    results = evaluate.run(cfg)
    assert results["stage"] == "zero_shot" and results["metrics"]["num_problems"] == 5
    assert results["generation"]["num_samples"] == 4 and results["generation"]["do_sample"] is True
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(len(r["generations"]) == 4 for r in rows)
    scored = ["pass@1_flexible", "pass@2_flexible", "pass@4_flexible", "maj@2_flexible", "maj@4_flexible"]
    assert {"prompt", "generation", "extracted_strict", "extracted_flexible", "gold", *scored} <= set(rows[0])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in scored:
        assert metrics[key] == pytest.approx(sum(r[key] for r in rows) / 5)
        assert metrics["intervals"][key]["n"] == 5 and metrics["intervals"][key]["low"] <= metrics[key]
    for row in rows:  # each row's scores from its own four samples
        samples = [extract_flexible(text) for text in row["generations"]]
        right = [float(answer == row["gold"]) for answer in samples]
        assert row["pass@1_flexible"] == pytest.approx(sum(right) / 4)
        assert row["pass@4_flexible"] == float(any(right))
        assert row["maj@4_flexible"] == sampled.majority_at_k(samples, right, 4)
    assert (tmp_path / "pass_at_k.png").stat().st_size > 0


def test_fewshot_prompt_prepends_train_exemplars(tmp_path: Path) -> None:
    cfg = compose_config(
        "model=tiny_llama", *EVAL_TINY, "prompt.num_fewshot=2", "limit=1", config_name="evaluate"
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    evaluate.run(cfg)
    prompt = json.loads((tmp_path / "predictions.jsonl").read_text())["prompt"]
    assert prompt.count("Question:") == 3 and prompt.count("#### ") == 2


def test_fine_tuned_checkpoints_load_with_their_own_architecture(tiny_config, tmp_path: Path) -> None:
    lora_run = train(
        tiny_config("model=tiny_llama", "method=lora", "data.max_train_samples=8", run_dir=tmp_path / "lora")
    )
    cfg = compose_config(
        "model=tiny_llama", f"ckpt={lora_run['run_dir']}", *EVAL_TINY, config_name="evaluate"
    )
    model, _ = load_saved(cfg)
    assert isinstance(model, PeftModel)
    assert any(n.endswith("lora_B.default.weight") and p.abs().sum() > 0 for n, p in model.named_parameters())

    full_run = train(
        tiny_config(
            "model=tiny_diffllama", "method=full", "data.max_train_samples=8", run_dir=tmp_path / "full"
        )
    )
    cfg = compose_config(
        "model=tiny_llama", f"ckpt={full_run['final_dir']}", *EVAL_TINY, config_name="evaluate"
    )
    model, _ = load_saved(cfg)
    assert type(model).__name__ == "DiffLlamaForCausalLM"  # read from the saved config, not from model=
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "eval")
    assert evaluate.run(cfg)["stage"] == "sft"


def test_unusable_ckpt_says_what_it_expects(tmp_path: Path) -> None:
    cfg = compose_config("model=tiny_llama", f"ckpt={tmp_path}", config_name="evaluate")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_saved(cfg)
