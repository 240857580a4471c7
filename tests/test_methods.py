"""The method family on every tiny architecture: what trains, save/load round trips, and each method's own
rules (SVD-adaptive LoRA: test_svd_lora.py)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import open_dict

from datamodules.padding_free import model_inputs
from evaluation import evaluate
from lightning_modules import methods
from lightning_modules.methods import MethodContext, adapter
from modeling import architecture, models
from modeling.classifier_head import SequenceClassifier
from modeling.generation import generate
from runtime import saved_run
from runtime.results import read_results
from runtime.training import build_trainable_model, run
from tests.conftest import compose_config
from tests.helpers import lm_logits, load_saved

TINY_MODELS = ["tiny_llama", "tiny_diffllama", "tiny_qwen2", "tiny_gpt2"]
# which parameter names each method may train
TRAINS = {
    "svd_lora": lambda name: "lora_" in name,
    "prompt_tuning": lambda name: "prompt_encoder" in name,
    "adapter": lambda name: "_adapter." in name,
}


def nudge(model: torch.nn.Module) -> None:
    """Move every trainable parameter off its initial value (LoRA B and adapter up-projections start at 0)."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)


@pytest.mark.parametrize("method", sorted(TRAINS))
@pytest.mark.parametrize("model_name", TINY_MODELS)
def test_method_trains_only_its_parameters_and_round_trips(
    tiny_config, tmp_path: Path, model_name: str, method: str
) -> None:
    cfg = tiny_config(
        f"model={model_name}",
        f"method={method}",
        "method.rank_eval_steps=2" if method == "svd_lora" else "data.batch_size=4",
    )
    L.seed_everything(0)
    model, tokenizer, datamodule, _ = build_trainable_model(cfg)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    model(**model_inputs(batch)).loss.backward()
    with_grad = {
        name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
    }
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert with_grad and with_grad <= trainable
    assert trainable == {name for name, _ in model.named_parameters() if TRAINS[method](name)}

    nudge(model)
    model.eval()
    expected = lm_logits(model, batch)
    saved_run.write_model(model, cfg.method, tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    saved_bytes = sum(f.stat().st_size for f in (tmp_path / "saved").glob("*.safetensors"))
    # trained part only
    assert saved_bytes < 8 * sum(p.numel() for p in model.parameters() if p.requires_grad) + 10_000

    eval_cfg = compose_config(f"model={model_name}", f"ckpt={tmp_path / 'saved'}", config_name="evaluate")
    L.seed_everything(0)  # the same random base weights (tiny models are built from scratch)
    restored, _ = load_saved(eval_cfg)
    restored.eval()
    actual = lm_logits(restored, batch)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("model_name", TINY_MODELS)
def test_adapters_at_init_leave_the_model_output_unchanged(model_name: str) -> None:
    cfg = compose_config(f"model={model_name}", "method=adapter")
    model, _ = models.build(cfg.model)
    model.eval()
    input_ids = torch.randint(3, 200, (2, 9))
    before = model(input_ids=input_ids).logits
    adapted = adapter.apply(model, MethodContext(cfg.model), bottleneck=cfg.method.bottleneck)
    assert len(architecture.block_parts(adapted)) == adapted.config.num_hidden_layers
    torch.testing.assert_close(adapted(input_ids=input_ids).logits, before, rtol=0, atol=0)
    nudge(adapted)
    assert not torch.allclose(adapted(input_ids=input_ids).logits, before)  # the hooks are live


def test_prompt_tuning_text_init_copies_the_word_embeddings() -> None:
    cfg = compose_config(
        "model=tiny_llama",
        "method=prompt_tuning",
        "method.num_virtual_tokens=7",
        "method.init=text",
        "method.init_text=abc",
    )
    model, tokenizer = models.build(cfg.model)
    tuned = methods.build(cfg.method)(model, MethodContext(cfg.model, tokenizer))
    ids = tokenizer("abcabca", add_special_tokens=False)["input_ids"]
    expected = model.get_input_embeddings().weight[ids]
    torch.testing.assert_close(tuned.prompt_encoder["default"].embedding.weight, expected)


@pytest.mark.parametrize("extra_token", [False, True])
@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gpt2"])
def test_projection_head_reads_the_whole_text_and_ignores_padding(model_name: str, extra_token: bool) -> None:
    torch.manual_seed(0)
    model, tokenizer = models.build(compose_config(f"model={model_name}").model)
    classifier = SequenceClassifier(
        model.requires_grad_(False), num_classes=3, extra_token=extra_token
    ).eval()
    texts = [
        "The match ended in a draw",
        "The match ended in a loss",
        "Shares fell sharply after the results",
    ]
    tokenizer.padding_side = "right"
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    logits = classifier(batch["input_ids"], batch["attention_mask"])
    assert not torch.allclose(logits[0], logits[1])  # the texts differ only in their last word
    alone = tokenizer(texts[:1], return_tensors="pt")
    torch.testing.assert_close(classifier(alone["input_ids"], alone["attention_mask"])[0], logits[0])
    assert {n for n, p in classifier.named_parameters() if p.requires_grad} == (
        {n for n, _ in classifier.head.named_parameters(prefix="head")}
        | ({"extra_token"} if extra_token else set())
    )


def test_projection_head_trains_saves_and_evaluates_from_its_run_dir(tiny_config, tmp_path: Path) -> None:
    results = run(
        tiny_config(
            "model=tiny_qwen2",
            "task=classification",
            "method=projection_head",
            "trainer.max_epochs=2",
            "optim.lr=1e-2",
            run_dir=tmp_path / "train",
        )
    )
    head_size = 2 * 64 + 64 * 128 + 128 + 128 * 4 + 4  # LayerNorm + Linear(h,128) + Linear(128,4)
    assert results["trainable_params"] == head_size
    assert (tmp_path / "train" / "confusion_matrix" / "val_epoch1.png").exists()
    assert {"val/accuracy", "val/macro_f1", "test/accuracy"} <= set(results["metrics"])
    final = Path(results["final_dir"])
    assert {p.name for p in final.glob("*.safetensors")} == {"classifier_head.safetensors"}

    cfg = compose_config(
        "model=tiny_qwen2",
        "task=classification",
        "task.source=bundled",
        f"ckpt={tmp_path / 'train'}",
        "print_config=false",
        config_name="evaluate",
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "eval")
    metrics = evaluate.run(cfg)["metrics"]
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert metrics["num_examples"] == len(rows) == 12
    assert metrics["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / 12)
    # same head, same test set
    assert metrics["accuracy"] == pytest.approx(results["metrics"]["test/accuracy"])
    assert (tmp_path / "eval" / "confusion_matrix.png").exists()
    # the head answers for the classes it was trained on: a task with other classes is refused by key
    with open_dict(cfg):
        cfg.task.class_names = ["a", "b", "c", "d"]
        cfg.paths.output_dir = str(tmp_path / "other")
    with pytest.raises(ValueError, match=r"projection head was trained on classes \[.*task.class_names"):
        evaluate.run(cfg)


def test_each_method_reports_its_trainable_share(tiny_config, tmp_path: Path) -> None:
    written = {}
    for method in ("full", "lora", "adapter", "prompt_tuning"):
        run(
            tiny_config(
                "model=tiny_llama",
                f"method={method}",
                "trainer.max_steps=1",
                "data.max_train_samples=4",
                "test_after_fit=false",
                run_dir=tmp_path / method,
            )
        )
        written[method] = read_results(tmp_path / method)
    total = written["full"]["total_params"]
    assert written["full"]["trainable_share"] == 1.0
    assert written["prompt_tuning"]["trainable_params"] == 20 * 64  # 20 virtual tokens x hidden 64
    # 2 blocks x 2 adapters
    assert written["adapter"]["trainable_params"] == 2 * 2 * (64 * 8 + 8 + 8 * 64 + 64)
    for method in ("adapter", "prompt_tuning"):
        assert written[method]["total_params"] == total + written[method]["trainable_params"]
        assert written[method]["trainable_share"] == pytest.approx(
            written[method]["trainable_params"] / written[method]["total_params"]
        )


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gpt2"])
def test_prompt_tuned_generation_is_the_same_batched_and_one_by_one(model_name: str) -> None:
    cfg = compose_config(f"model={model_name}", "method=prompt_tuning")
    torch.manual_seed(0)
    model, tokenizer = models.build(cfg.model)
    tuned = methods.build(cfg.method)(model, MethodContext(cfg.model, tokenizer))
    with torch.no_grad():
        tuned.prompt_encoder["default"].embedding.weight.normal_(0, 1.0)  # a prompt that steers the output
    prompts = [
        "Question: 2+3?\nAnswer:",
        "Q:",
        "Question: Tom has 5 apples and buys 7 more. How many?\nAnswer:",
        "Q: 1+1?",
    ]
    batched = generate(tuned, tokenizer, prompts, batch_size=4, max_new_tokens=10)
    alone = [generate(tuned, tokenizer, [p], batch_size=1, max_new_tokens=10)[0] for p in prompts]
    # GPT-2's absolute positions would shift under left padding (peft drops position ids)
    assert batched == alone
