"""objective=grpo|dpo (docs/rl.md): refused before any weights load where it cannot run; composes with every
method; GRPO raises a reward a few steps can raise, with a verdict from the paired test; DPO raises the
chosen-over-rejected margin; a GRPO run interrupted mid-epoch, between two steps on one generation batch,
resumes to the same losses and weights (its rollouts sampled by lmlab or by a vLLM engine); the reference
policy is the model as training starts."""

from __future__ import annotations

import json
import string
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import open_dict

from datamodules.gsm8k import GSM8KTask
from lightning_modules.dpo import pair_log_probs
from lightning_modules.rollouts import ReferencePolicy, Reward, completion_batch, completion_log_probs
from lightning_modules.task_modules import task_module_class
from modeling.generation import generate
from runtime.results import logged_rows
from runtime.training import build_trainable_model, run
from runtime.validate import ConfigError, check
from stats.estimates import paired
from tests.families import overrides
from tests.test_resume import interrupted_run
from tests.test_train import final_weights

# a reward a tiny random byte-level model already earns about 1 in 10 of (tests/fixtures/letter_task.py)
LETTERS = [
    "model=tiny_llama",
    "task=prompt_response",
    "objective=grpo",
    "task.definition._target_=tests.fixtures.letter_task.LetterShareTask",
    "objective.reward={letter_share: 1.0}",
    "objective.num_generations=8",
    "objective.max_completion_length=8",
    "objective.stop_strings=[]",
    "data.batch_size=32",
    "data.val_size=8",
    "optim.warmup_ratio=0",
]
GRPO_SMALL = ["objective.num_generations=2", "objective.max_completion_length=6", "data.batch_size=4"]


@pytest.fixture
def letters(tmp_path: Path) -> list[str]:
    """LETTERS on a file of 40 prompts whose reference is the lowercase alphabet."""
    path = tmp_path / "letters.jsonl"
    rows = [{"prompt": f"Write letters {i}:", "response": string.ascii_lowercase} for i in range(40)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return [*LETTERS, f"task.data_files={{train: {path}, test: {path}}}"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["objective=grpo", "task=cosmopedia"], "task 'cosmopedia' has no reward"),
        (["objective=grpo", "objective.num_generations=1"], "objective.num_generations=1"),
        (["objective=grpo", "data.batch_size=6"], "data.batch_size=6 is not divisible"),
        (["objective=grpo", "objective.loss_type=ppo"], "objective.loss_type='ppo'"),
        (["objective=grpo", "task=classification", "method=projection_head"], "method 'projection_head'"),
        (["objective=dpo", "task=gsm8k"], "task 'gsm8k' has none"),
        (["objective=dpo", "task=preferences", "objective.loss_type=hinge"], "objective.loss_type='hinge'"),
    ],
)
def test_what_an_objective_cannot_run_is_refused_before_any_weights_load(
    tiny_config, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check(tiny_config("model=tiny_llama", *overrides), "train")


def test_dpo_data_without_a_mapped_column_is_refused_naming_the_file_line_and_key(
    tiny_config, tmp_path: Path
) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "a", "worse": "b"}) + "\n")
    cfg = tiny_config("objective=dpo", "task=preferences", f"task.data_files={data}")
    with pytest.raises(ConfigError, match=rf"{data}:1: column 'rejected' \(task.columns.rejected\)"):
        check(cfg, "train")
    ok = tiny_config(
        "objective=dpo", "task=preferences", f"task.data_files={data}", "task.columns.rejected=worse"
    )
    check(ok, "train")


def test_a_reward_weighs_the_task_scores_and_names_an_unknown_one() -> None:
    def gsm8k(text: str, reference: str) -> dict:
        return {**GSM8KTask.score(None, text, reference), "answer_correct": None}

    weighted = Reward(gsm8k, {"exact_match_flexible": 1.0, "answer_correct": 2.0}, format_weight=0.5)
    assert weighted("so it is 12.", "12")[0] == 1.0  # right, not in "#### n" form; None counts 0
    assert weighted("so it is\n#### 12", "12")[0] == 1.5  # and in the task's answer format
    assert weighted("#### 13", "12")[0] == 0.5
    with pytest.raises(ValueError, match=r"objective.reward.rouge_l: .* scores \['answer_correct'"):
        Reward(gsm8k, {"rouge_l": 1.0})("x", "12")


class TrainableChange(L.Callback):
    """Writes to `path` how many trainable tensors training changed."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        now = dict(pl_module.named_parameters())
        self.path.write_text(str(sum(not torch.equal(now[n], p) for n, p in self.start.items())))


@pytest.mark.parametrize("objective", ["grpo", "dpo"])
@pytest.mark.parametrize("method", ["full", "lora", "svd_lora", "adapter", "prompt_tuning"])
def test_every_method_trains_under_each_objective(
    tiny_config, tmp_path: Path, letters: list[str], objective: str, method: str
) -> None:
    small = ["objective.num_generations=4", "data.batch_size=8"]
    task = (
        [*letters, *small]
        if objective == "grpo"
        else ["model=tiny_llama", "task=preferences", "objective=dpo"]
    )
    cfg = tiny_config(
        *task, f"method={method}", "trainer.max_steps=2", "data.max_eval_samples=4", "optim.lr=1e-2",
    )  # fmt: skip
    with open_dict(cfg):
        cfg.callbacks.change = {"_target_": f"{__name__}.TrainableChange", "path": str(tmp_path / "changed")}
    results = run(cfg)
    assert results["global_step"] == 2
    assert (
        ("test/reward" in results["metrics"])
        if objective == "grpo"
        else ("test/rewards/margin" in results["metrics"])
    )
    assert int((tmp_path / "changed").read_text()) > 0
    assert list(Path(results["final_dir"]).glob("*.safetensors"))  # exported like every run


@pytest.mark.parametrize("family", ["minimind", "mixtral", "jamba"])  # remote code, experts, a hybrid
def test_grpo_trains_a_remote_code_a_mixture_and_a_hybrid_model(
    tiny_config, tmp_path: Path, minimind_dir: Path, letters: list[str], family: str
) -> None:
    model = [o for o in overrides(family, minimind_dir) if not o.startswith("model.memit")]
    small = ["objective.num_generations=4", "data.batch_size=8", "trainer.max_steps=2"]
    small.append("test_after_fit=false")
    cfg = tiny_config(*letters[1:], *model, *small, "method=lora", "optim.lr=1e-2")
    with open_dict(cfg):
        cfg.callbacks.change = {"_target_": f"{__name__}.TrainableChange", "path": str(tmp_path / "changed")}
    assert run(cfg)["global_step"] == 2
    assert int((tmp_path / "changed").read_text()) > 0


def greedy_rewards(module, prompts: list[dict]) -> list[float]:
    texts = generate(module.model, module.task.tokenizer, [p["prompt"] for p in prompts], max_new_tokens=8)
    return [module.reward(text, p["reference"])[0] for [text], p in zip(texts, prompts, strict=True)]


def test_grpo_raises_the_validation_reward_with_a_paired_verdict(tiny_config, letters: list[str]) -> None:
    cfg = tiny_config(*letters, "method=full", "optim.lr=3e-3")
    L.seed_everything(cfg.seed)
    model, _, datamodule, _ = build_trainable_model(cfg)
    datamodule.setup("fit")
    module = task_module_class("grpo").from_config(model, cfg, datamodule.task)
    prompts = datamodule.datasets["val"]
    before = greedy_rewards(module, prompts)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    after = greedy_rewards(module, prompts)
    comparison = paired(after, before)
    assert comparison.low > 0 and comparison.p < 0.05, (before, after)


def test_dpo_raises_the_margin_of_the_chosen_responses(tiny_config) -> None:
    tied = "+model.architecture.tie_word_embeddings=true"  # its gradient sent sparse: test_tied_embedding.py
    cfg = tiny_config(
        "model=tiny_llama", tied, "objective=dpo", "task=preferences", "method=full", "optim.lr=1e-3"
    )
    with open_dict(cfg):
        cfg.trainer.max_steps, cfg.test_after_fit = 6, False
    L.seed_everything(cfg.seed)
    model, _, datamodule, _ = build_trainable_model(cfg)
    datamodule.setup("fit")
    module = task_module_class("dpo").from_config(model, cfg, datamodule.task)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    assert module.sparse_embedding
    examples = datamodule.datasets["train"]
    batch = datamodule.collate(examples)
    with torch.no_grad():
        chosen, rejected = pair_log_probs(module.model.eval(), batch)[0].double().chunk(2)
    reference = module.reference["train"]  # computed from the model as training started
    margins = (chosen - reference[:, 0]) - (rejected - reference[:, 1])  # [pairs]; 0 for every pair at start
    comparison = paired(margins.tolist(), [0.0] * len(margins))
    assert comparison.low > 0, margins


@pytest.mark.parametrize("backend", ["lmlab", "vllm"])  # vllm: the stand-in engine (tests/test_grpo_vllm.py)
def test_a_grpo_run_interrupted_mid_epoch_between_reuses_resumes_to_the_same_losses(
    tiny_config, tmp_path: Path, letters: list[str], backend: str, request: pytest.FixtureRequest
) -> None:
    if backend == "vllm":
        request.getfixturevalue("stand_in")
    overrides = [
        *letters, *GRPO_SMALL, f"objective.generation_backend={backend}", "objective.num_iterations=2",
        "objective.disable_dropout=false", "method=lora",
        "method.dropout=0.1", "data.max_train_samples=12", "trainer.max_epochs=2", "optim.lr=1e-2",
        "callbacks.last_checkpoint.every_n_train_steps=3", "test_after_fit=false", "data.max_eval_samples=2",
    ]  # fmt: skip
    # 12 prompts, 2 a step, each batch twice: 12 steps an epoch; step 3 is the first of a batch's two steps
    straight = run(tiny_config(*overrides, run_dir=tmp_path / "straight"))
    last = interrupted_run(tiny_config, overrides, tmp_path / "interrupted", 5)
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 3 and saved["grpo_rollout"]["uses"] == 1
    resumed = run(tiny_config(*overrides, f"ckpt_path={last}", run_dir=tmp_path / "resumed"))
    assert resumed["global_step"] == straight["global_step"] == 24

    def losses(run_dir: Path) -> dict[int, float]:
        return {int(r["step"]): r["train/loss"] for r in logged_rows(run_dir) if "train/loss" in r}

    first, again = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert len({round(loss, 6) for loss in first.values()}) > 3  # the rewards vary: a loss to compare
    assert again and all(again[step] == first[step] for step in again), (first, again)
    a, b = final_weights(straight), final_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("method", "copies"), [("lora", False), ("full", True)])
def test_the_reference_policy_is_the_model_as_training_starts(tiny_config, method: str, copies: bool) -> None:
    cfg = tiny_config("model=tiny_llama", f"method={method}")
    model = build_trainable_model(cfg)[0].eval()
    batch = completion_batch([[5, 6, 7]], [[20, 21, 22]], pad_id=0)
    start = completion_log_probs(model, batch)[0]
    reference = ReferencePolicy(model)
    assert (reference.copy is not None) == copies  # an adapter's disabled base, no second model
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.5)
    assert not torch.allclose(completion_log_probs(model, batch)[0], start)
    assert torch.allclose(reference.log_probs(model, batch), start, atol=1e-6)


def test_a_pissa_adapter_gets_a_frozen_reference_copy(tiny_config) -> None:
    """PiSSA moves the principal part of each weight into the adapter: its disabled base is not the start."""
    model = build_trainable_model(tiny_config("model=tiny_llama", "method=lora", "method.init=pissa"))[0]
    assert ReferencePolicy(model).copy is not None
