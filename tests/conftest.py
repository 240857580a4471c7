"""Shared test helpers, in one place: compose the real Hydra configs with tiny, offline, CPU settings
(`compose_config`, `tiny_config`), build a tiny model from them (`built_model`, `family_model`) and run an
entrypoint in a fresh process (`launch`). A run's results.json is read with runtime.results.read_results, its
logged metrics with runtime.results.logged_rows."""

from __future__ import annotations

import functools
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from modeling.models import CONF_DIR
from tests import warm_python

ROOT = CONF_DIR.parent

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one thread per process: the suite runs as parallel pytest workers (make test: -n auto), and tiny models gain
# nothing from more; workers (and the subprocesses they start) sharing the cores would spin against each other
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# The settings every test run shares: bundled data, CPU, no progress bars, no config tree.
TINY = [
    "task.source=bundled",
    "trainer=cpu",
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "print_config=false",
    "data.max_length=512",
]


# the modules of long subprocess runs go first, so parallel workers (make test: -n auto) do not end on them
FIRST = (
    "test_docs.py",
    "test_resume.py",
    "test_entrypoints.py",
    "test_session.py",
    "test_pretrain.py",
    "test_reliability.py",
    "test_bench_quick.py",
)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker more than there are cores. Much of the suite waits on processes it starts
    (their imports, a checkpoint's fsync, a timeout) with a core idle; a third worker on two cores filled
    that and took the suite from 14:20 to 13:41 (bench/README.md)."""
    return (os.cpu_count() or 1) + 1


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the modules in FIRST before the others (each module's own order kept)."""
    items.sort(key=lambda item: FIRST.index(item.path.name) if item.path.name in FIRST else len(FIRST))


def compose_config(*overrides: str, config_name: str = "train", hydra_config: bool = False) -> DictConfig:
    """Compose `conf/<config_name>.yaml` with overrides, as the entrypoint would."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(config_name, overrides=list(overrides), return_hydra_config=hydra_config)


def launch(
    *arguments: str,
    cwd: Path = ROOT,
    timeout: int = 600,
    env: dict[str, str | None] | None = None,
    check: bool = True,
    python: bool = True,
    warm: bool = True,
) -> subprocess.CompletedProcess:
    """Run `python <arguments>` (an entrypoint, `-m <module>` or a bench script; with `python=False`,
    `arguments` is the whole command) in a fresh process with W&B offline, capturing its output. `env`
    adds variables (None removes one); with `check`, fail showing the command and the end of its output
    unless it exits 0. A Python command forks from a warm server that has the libraries imported
    (tests/warm_python.py); `warm=False` starts the interpreter cold."""
    environment = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    environment = {key: value for key, value in environment.items() if value is not None}
    command = [sys.executable, *arguments] if python else list(arguments)
    if command[0] == sys.executable and warm:
        result = warm_python.run(command[1:], cwd, environment, timeout)
    else:
        result = subprocess.run(
            command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=environment
        )
    if check:
        assert result.returncode == 0, (
            f"{shlex.join(command)}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        )
    return result


def built_model(*overrides: str, config_name: str = "train") -> tuple[DictConfig, Any, Any]:
    """(config, model in eval mode, tokenizer) of a tiny model composed with `overrides`, from seed 0."""
    import lightning as L

    from modeling import models

    cfg = compose_config(*overrides, config_name=config_name)
    L.seed_everything(0)
    model, tokenizer = models.build(cfg.model)
    return cfg, model.eval(), tokenizer


def composed_in(tmp_path: Path, *overrides: str, config_name: str) -> DictConfig:
    """The config of `config_name` with `overrides`, its run dir tmp_path/run and its cache under tmp_path."""
    cfg = compose_config(*overrides, config_name=config_name)
    with open_dict(cfg):
        cfg.paths.output_dir, cfg.paths.cache_dir = str(tmp_path / "run"), str(tmp_path / "cache")
    return cfg


def fresh_family(name: str, minimind_dir: Path) -> tuple[DictConfig, Any, Any]:
    """(config, model in training mode, tokenizer) of family `name` (tests/families.py), built anew for a test
    that changes it."""
    from tests.families import overrides

    cfg, model, tokenizer = built_model(*overrides(name, minimind_dir))
    return cfg, model.train(), tokenizer


@pytest.fixture
def tiny_config(tmp_path: Path) -> Callable[..., DictConfig]:
    """Factory: a tiny offline train config whose run dir and cache live under tmp_path."""

    def make(*overrides: str, run_dir: Path | None = None) -> DictConfig:
        cfg = compose_config(*TINY, *overrides)
        with open_dict(cfg):
            cfg.paths.output_dir = str(run_dir or tmp_path / "run")
            cfg.paths.cache_dir = str(tmp_path / "cache")
        return cfg

    return make


@pytest.fixture(scope="session")
def minimind_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random MiniMind (the remote-code fixture) saved as a hub checkpoint is, loaded with
    model.path=; its mixture-of-experts variant in moe/."""
    from tests.remote_code import save_tiny_minimind

    directory = save_tiny_minimind(tmp_path_factory.mktemp("minimind"))
    save_tiny_minimind(directory / "moe", use_moe=True)  # the MiniMind-MoE stand-in (tests/families.py)
    return directory


@pytest.fixture(scope="session")
def family_model(minimind_dir: Path) -> Callable[[str], tuple[DictConfig, Any, Any]]:
    """Factory: (train config, model, tokenizer) of a family's tiny model (tests/families.py), built once per
    session from seed 0 and shared by the capability tests; they leave it as they found it."""
    from tests.families import overrides

    @functools.cache
    def build(name: str) -> tuple[DictConfig, Any, Any]:
        return built_model(*TINY, *overrides(name, minimind_dir))

    return build


def only_run(directory: Path) -> Any:
    """The one offline W&B run under `directory`, read back."""
    from runtime.wandb_offline import find_run_files, read_run

    (run_file,) = find_run_files(directory)
    return read_run(run_file, wait=60)


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The vLLM stand-in (tests/fixtures/vllm_stand_in) importable as `vllm` for one test; yields the file
    its engines, requests, reloads and answers are logged to."""
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "fixtures" / "vllm_stand_in"))
    log = tmp_path / "vllm_requests.jsonl"
    monkeypatch.setenv("VLLM_STAND_IN_LOG", str(log))
    yield log
    for name in [name for name in sys.modules if name == "vllm" or name.startswith("vllm.")]:
        del sys.modules[name]


@pytest.fixture(scope="session")
def saved_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_llama (seed 0) saved with save_pretrained, to load as `model.path=`."""
    directory = tmp_path_factory.mktemp("tiny_llama")
    _, model, tokenizer = built_model("model=tiny_llama")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
