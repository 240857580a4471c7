"""The docs are tests: every shell command in README.md's and docs/*.md's code blocks and in the config
comments runs as written, in a subprocess, with only scale-down overrides appended (a hub model swapped for
the tiny model of its family, the bundled sample or small local files for the data, a few steps), and what its
page promises is checked. A command that cannot run here is listed in NOT_HERE with the reason. Commands that
use what an earlier one wrote (`<run dir>`, `<time>`) run after it, in one scenario; the placeholders are
filled from what it wrote. Files the docs' commands read (`data/...`, `saved/my_model`, `prompts.txt`) are
written small into the workspace."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import docs_causal, docs_evaluation, docs_rl
from tests.conftest import ROOT
from tests.docs_scenarios import DOWNLOADS, SCENARIOS
from tests.docs_workspace import NOT_HERE, Workspace, documented_commands, scaled
from tests.helpers import FakeEndpoint, serving

# -- what each page promises
# -----------------------------------------------------------------------------------------


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
    docs_evaluation.write_inputs(tmp_path)
    docs_rl.write_inputs(tmp_path)
    docs_causal.write_inputs(tmp_path)
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
    for name, files in (
        ("gsm8k", "{train: data/gsm8k/train.jsonl, test: data/gsm8k/test.jsonl}"),
        ("hotpotqa", "{test: data/hotpotqa/hotpot_dev_distractor.json}"),
    ):
        downloaded = datamodules.build_task(compose_config(f"task={name}", f"task.data_files={files}"), None)
        bundled_copy = datamodules.build_task(compose_config(f"task={name}", "task.source=bundled"), None)
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
