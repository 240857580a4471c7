"""The real train.py entrypoint in subprocesses: a -m sweep, DDP on 2 CPU processes, W&B offline."""

from __future__ import annotations

import csv
import json
import shutil
import string
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from runtime.results import logged_rows, read_results
from runtime.wandb_offline import find_run_files, read_run
from tests.conftest import TINY, launch


def train(
    *overrides: str, multirun: bool = False, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return launch("train.py", *(["-m"] if multirun else []), *TINY, "model=tiny_llama", *overrides, env=env)


# GRPO: each rank samples and rewards completions of its own prompts (tests/fixtures/letter_task.py's reward)
GRPO = [
    "objective=grpo",
    "task=prompt_response",
    "task.definition._target_=tests.fixtures.letter_task.LetterShareTask",
    "objective.reward={letter_share: 1.0}",
    "objective.num_generations=4",
    "objective.max_completion_length=8",
    "data.batch_size=8",
    "trainer.max_steps=3",
    "optim.lr=1e-2",
]


@pytest.mark.xdist_group("processes")  # starts several training processes: one such test at a time
@pytest.mark.parametrize("objective", ["sft", "grpo"])
def test_ddp_on_two_cpu_processes_keeps_ranks_in_sync(tmp_path: Path, objective: str) -> None:
    if objective == "grpo":
        rows = [{"prompt": f"Write letters {i}:", "response": string.ascii_lowercase} for i in range(40)]
        (tmp_path / "letters.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = f"task.data_files={{train: {tmp_path / 'letters.jsonl'}, test: {tmp_path / 'letters.jsonl'}}}"
    train(
        *([*GRPO, data] if objective == "grpo" else []),
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "method=lora",
        "data.max_train_samples=16",
        f"hydra.run.dir={tmp_path}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "+callbacks.dump._target_=tests.helpers.DumpWeightsPerRank",
        f"+callbacks.dump.dirpath={tmp_path}",
    )
    rank0, rank1 = (load_file(tmp_path / f"weights_rank{r}.safetensors") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and rank0
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert any(k.endswith("lora_B.default.weight") and rank0[k].abs().sum() > 0 for k in rank0)


def logged_steps(run_dir: Path, key: str) -> list[float]:
    return [row[key] for row in logged_rows(run_dir) if key in row]


@pytest.mark.xdist_group("processes")  # starts several training processes: one such test at a time
@pytest.mark.parametrize("method", ["full", "lora"])
def test_fsdp_on_two_cpu_processes_trains_like_ddp_and_exports_what_it_trained(
    method: str, tmp_path: Path
) -> None:
    """FSDP (one unit per decoder layer, activation checkpointing, gloo) and DDP on the same seed and data:
    the same loss at every step. Tolerance 1e-5 relative: the two reduce gradients in a different order
    (reduce-scatter of shards vs all-reduce of buckets), which changes float32 sums in the last bits, nothing
    more. Full fine-tuning trains a tied embedding, whose gradient is sent sparse (modeling/tied_embedding.py)
    under both strategies."""
    tied = ["+model.architecture.tie_word_embeddings=true"] if method == "full" else []
    common = [
        *tied,
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        f"method={method}",
        "method.dropout=0.1" if method == "lora" else "+model.architecture.attention_dropout=0.1",
        "data.max_train_samples=40",
        "trainer.max_steps=4",
        "metrics.every_n_steps=1",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    for strategy in ("ddp", "fsdp"):
        train(f"trainer={strategy}", *common, f"hydra.run.dir={tmp_path / strategy}")
    losses = {s: logged_steps(tmp_path / s, "train/loss_step") for s in ("ddp", "fsdp")}
    norms = {s: logged_steps(tmp_path / s, "train/grad_norm") for s in ("ddp", "fsdp")}
    assert len(losses["fsdp"]) == 4 and losses["fsdp"] == pytest.approx(losses["ddp"], rel=1e-5)
    # FSDP: summed over shards
    assert len(norms["fsdp"]) == 4 and norms["fsdp"] == pytest.approx(norms["ddp"], rel=1e-4)
    assert losses["fsdp"][-1] != losses["fsdp"][0]
    results = {s: read_results(tmp_path / s) for s in ("ddp", "fsdp")}
    assert results["fsdp"]["global_step"] == 4 and results["fsdp"]["diverged"] is False
    # the test stage (on by default) measures the weights FSDP trained: DDP's test loss, after the export
    assert results["fsdp"]["tested"] == {"weights": "last", "global_step": 4}
    assert results["fsdp"]["metrics"]["test/loss"] == pytest.approx(
        results["ddp"]["metrics"]["test/loss"], rel=1e-5
    )
    # the FSDP checkpoint is consolidated on rank 0: the same keys and (nearly) the same weights as DDP's
    ddp, fsdp = (
        torch.load(tmp_path / s / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        for s in ("ddp", "fsdp")
    )
    assert ddp.keys() == fsdp.keys()
    assert max((ddp[k] - fsdp[k]).abs().max().item() for k in ddp) < 1e-5
    # final/ is what a single-device run exports: evaluate.py's model from it has the logits of the unsharded
    # model carrying the weights FSDP trained (the base rebuilt with the run's seed, then last.ckpt)
    if tied:  # one weight, trained as one
        assert torch.equal(fsdp["model.lm_head.weight"], fsdp["model.model.embed_tokens.weight"])
    assert_export_matches_checkpoint(tmp_path / "fsdp", method, fsdp, *tied)


def assert_export_matches_checkpoint(
    run_dir: Path, method: str, trained: dict[str, torch.Tensor], *model_overrides: str
) -> None:
    import lightning as L
    from omegaconf import open_dict

    from lightning_modules.task_modules import task_module_class
    from runtime.training import build_trainable_model
    from tests.conftest import compose_config
    from tests.helpers import load_saved

    assert (run_dir / "final" / ("adapter_config.json" if method == "lora" else "model.safetensors")).exists()
    evaluate_cfg = compose_config(f"ckpt={run_dir}", config_name="evaluate")  # the run's own model
    train_cfg = compose_config(*TINY, "model=tiny_llama", *model_overrides, f"method={method}")
    for cfg in (evaluate_cfg, train_cfg):
        with open_dict(cfg):
            cfg.paths.output_dir = str(run_dir.parent / "reference")
            cfg.paths.cache_dir = str(run_dir.parent / "cache")
    L.seed_everything(42)
    exported, tokenizer = load_saved(evaluate_cfg)
    L.seed_everything(42)
    model, _, datamodule, _ = build_trainable_model(train_cfg)
    reference = task_module_class("causal_lm").from_config(model, train_cfg, datamodule.task)
    # a frozen base: trainable weights only
    reference.load_state_dict(trained, strict=reference.strict_loading)
    input_ids = tokenizer("Question: 2 + 3 = ?\nAnswer:", return_tensors="pt")["input_ids"]
    exported.eval(), reference.eval()
    with torch.no_grad():
        expected = reference.model(input_ids=input_ids).logits
        assert torch.allclose(exported(input_ids=input_ids).logits, expected, atol=1e-5)


def test_wandb_offline_run_records_the_logged_metrics_and_never_the_key(tmp_path: Path) -> None:
    secret = "lmlab-test-secret-" + "0123456789abcdef" * 2
    train(
        "logger=wandb",
        "data.max_train_samples=8",
        f"hydra.run.dir={tmp_path}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        env={"WANDB_API_KEY": secret, "WANDB_MODE": "offline"},
    )
    (run_file,) = find_run_files(tmp_path)
    history = read_run(run_file).history
    logged = {key for row in history for key in row}
    assert {"train/loss_step", "val/loss", "test/loss", "params/trainable"} <= logged
    losses = [row["train/loss_step"] for row in history if "train/loss_step" in row]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaked == []


def test_evaluate_entrypoint_runs_classification_and_socratic_tasks(tmp_path: Path) -> None:
    launch(
        "evaluate.py",
        "-m",
        "model=tiny_llama",
        "task=classification,socratic_math",
        "task.source=bundled",
        "generation.max_new_tokens=4",
        "print_config=false",
        "logger=csv",
        f"hydra.sweep.dir={tmp_path}",
    )
    classification = json.loads((tmp_path / "0" / "metrics.json").read_text())
    socratic = json.loads((tmp_path / "1" / "metrics.json").read_text())
    assert classification["num_examples"] == 12 and 0 <= classification["accuracy"] <= 1
    assert socratic["num_problems"] == 3 and 0 <= socratic["corpus_bleu"] <= 100


def test_slurm_sweep_script_requests_two_nodes_of_eight_gpus_with_one_task_per_gpu() -> None:
    """As documented, on a machine without `srun` (where a submission is prepared), in a subprocess."""
    assert shutil.which("srun") is None
    result = launch(
        "-m",
        "runtime.slurm",
        "model=llama2_13b",
        "trainer=fsdp",
        "trainer.devices=8",
        "trainer.num_nodes=2",
        "method=lora",
        timeout=300,
    )
    script = result.stdout
    directives = {line for line in script.splitlines() if line.startswith("#SBATCH")}
    assert {
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --time=240",
        "#SBATCH --signal=USR2@120",
    } <= directives
    assert script.rstrip().endswith("python train.py") and "srun --unbuffered" in script


@pytest.mark.xdist_group("processes")  # starts several training processes: one such test at a time
def test_submitit_local_sweep_runs_each_job_in_its_own_process_and_reports_a_failed_one(
    tmp_path: Path,
) -> None:
    """The cluster launcher plugin with its local executor: three jobs, one with an invalid batch size."""
    result = launch(
        "train.py",
        "-m",
        "hydra/launcher=submitit_local",
        *TINY,
        "model=tiny_llama",
        "logger=wandb",
        "data.batch_size=4,8,0",
        "data.max_train_samples=8",
        "trainer.max_steps=2",
        "test_after_fit=false",
        f"hydra.sweep.dir={tmp_path}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        check=False,
    )
    assert result.returncode != 0  # Hydra reports the failed job ...
    with (tmp_path / "summary.csv").open() as handle:
        rows = {row["job"]: row for row in csv.DictReader(handle)}  # ... and the summary still has every job
    assert [rows[j]["status"] for j in ("0", "1", "2")] == ["ok", "ok", "failed"]
    assert "data.batch_size=0" in rows["2"]["overrides"] and "data.batch_size" in rows["2"]["error"]
    assert all(float(rows[j]["train/loss_step"]) > 0 for j in ("0", "1"))
    # submitit's job folders: the jobs ran through it
    assert len(list((tmp_path / ".submitit").iterdir())) >= 1
    runs = [read_run(find_run_files(tmp_path / j)[0]) for j in ("0", "1")]
    assert runs[0].run_id != runs[1].run_id and runs[0].group == runs[1].group
    assert [run.config["data.batch_size"] for run in runs] == [4, 8]
