"""Every key in conf/ is read by something: lmlab's code, another config's interpolation, or the callable that
a `_target_` instantiates with it. A key nothing reads is a setting that silently does nothing."""

from __future__ import annotations

import importlib
import inspect
import io
import re
import tokenize
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from transformers import AutoConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# instantiate/Hydra keywords and the defaults list
HYDRA_KEYS = {"defaults", "_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
# what a group's node is instantiated as where a file (an experiment, an override) leaves out its `_target_`
GROUP_TARGETS = {"trainer": "lightning.pytorch.Trainer"}
# where a class's **kwargs go, for the classes that pass them on to something other than their base
KWARGS_GO_TO = {
    "PeakThroughputMonitor": "lightning.fabric.utilities.throughput.Throughput",
    "FSDPStrategy": "torch.distributed.fsdp.FullyShardedDataParallel",
}
# groups whose top-level keys name entries of a collection (each entry is itself checked)
COLLECTIONS = {"callbacks", "logger"}
# the package (node) each group's files fill, where it is not the group's own name
PACKAGES = {"model_family": "model", "task_base": "task"}


@cache
def names_in_code() -> frozenset[str]:
    """Every identifier and every word inside a string literal of lmlab's Python code."""
    names: set[str] = set()
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).parts
        if parts[0].startswith(".") or {"tests", "bench"} & set(parts):  # venvs (.venv, .venv-vllm), .git
            continue
        for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if token.type == tokenize.NAME:
                names.add(token.string)
            elif token.type == tokenize.STRING:
                names.update(IDENTIFIER.findall(token.string))
    return frozenset(names)


@cache
def names_in_interpolations() -> frozenset[str]:
    """Every key name that some config's `${...}` interpolation reads."""
    names: set[str] = set()
    for path in CONF.rglob("*.yaml"):
        for reference in re.findall(r"\$\{([^}]*)\}", path.read_text()):
            names.update(IDENTIFIER.findall(reference))
    return frozenset(names)


@cache
def parameters(target: str) -> frozenset[str]:
    """The keyword arguments the callable a `_target_` names can take: a class's through the `__init__`s of
    its bases that **kwargs reach, then through `KWARGS_GO_TO`."""
    module, _, name = target.rpartition(".")
    found = getattr(importlib.import_module(module), name)
    if not inspect.isclass(found):
        return frozenset(inspect.signature(found).parameters)
    names: set[str] = set()
    for klass in found.__mro__:
        if "__init__" not in vars(klass):
            continue
        signature = inspect.signature(klass.__init__)
        names |= set(signature.parameters)
        if klass.__name__ in KWARGS_GO_TO:
            return frozenset(names | parameters(KWARGS_GO_TO[klass.__name__]))
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
            break
    return frozenset(names)


def config_fields(model_type: str) -> set[str]:
    """The fields a transformers config of `model_type` has."""
    return set(AutoConfig.for_model(model_type).to_dict())


def unread_keys(node: dict[str, Any], path: str, target: str | None = None) -> Iterator[str]:
    """Dotted paths under `node` that nothing reads, and why."""
    target = node.get("_target_") or target
    for key, child in node.items():
        where = f"{path}.{key}" if path else str(key)
        if key in HYDRA_KEYS:
            continue
        if where.endswith(".architecture") and isinstance(child, dict):
            fields = config_fields(child["model_type"])
            yield from (
                f"{where}.{k}: not a {child['model_type']} config field"
                for k in child
                if k != "model_type" and k not in fields
            )
            continue
        if target:  # instantiated with it, or read (and taken out) by lmlab first
            if key not in parameters(target) and key not in names_in_code():
                yield f"{where}: not a parameter of {target}"
        elif path in COLLECTIONS:
            pass
        elif where.startswith("judge.prompts."):
            if key != "default" and not (CONF / "task" / f"{key}.yaml").exists():
                yield f"{where}: no task of that name"
        elif key not in names_in_code() and key not in names_in_interpolations():
            yield f"{where}: no code or interpolation reads '{key}'"
        if isinstance(child, dict):
            yield from unread_keys(child, where, GROUP_TARGETS.get(where))


def config_files() -> Iterator[tuple[Path, str, dict[str, Any]]]:
    """(file, the node it fills, its content) of every config file but Hydra's own."""
    for path in sorted(CONF.rglob("*.yaml")):
        relative = path.relative_to(CONF)
        if relative.parts[0] == "hydra":
            continue
        text = path.read_text()
        content = yaml.safe_load(text) or {}
        content.pop("hydra", None)
        if len(relative.parts) == 1 or text.startswith("# @package _global_"):
            yield path, "", content
        else:
            group = relative.parts[0]
            yield path, PACKAGES.get(group, group), content


def test_every_config_key_is_read_by_something() -> None:
    unread = []
    for path, package, content in config_files():
        wrapped = {package: content} if package else content
        unread += [f"{path.relative_to(ROOT)}: {problem}" for problem in unread_keys(wrapped, "")]
    assert not unread, "\n".join(unread)


def test_the_check_finds_an_unread_key_a_misspelt_trainer_flag_and_a_wrong_config_field() -> None:
    node = {
        "model": {
            "architecture": {"model_type": "llama", "hidden_size": 8, "hiden_size": 8},
            "unused_setting": 1,
        },
        "trainer": {"max_steps": 2, "max_step": 2},
    }
    found = list(unread_keys(node, ""))
    assert found == [
        "model.architecture.hiden_size: not a llama config field",
        "model.unused_setting: no code or interpolation reads 'unused_setting'",
        "trainer.max_step: not a parameter of lightning.pytorch.Trainer",
    ]
