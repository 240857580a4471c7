"""The text around the documented commands, kept true: every inline `python ...` command parses with the
shell's and Hydra's rules and composes (or names options its script has), bench/README.md's commands too; the
run dirs, logs and logger defaults of docs/outputs.md and its table of a bare run's defaults are the ones the
configs compose; no user-facing text speaks of the machine it was written on; every abbreviation is in the
glossary."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from tests.conftest import ROOT, compose_config
from tests.docs_workspace import FENCE, HYDRA_ENTRYPOINTS, without_comment

USER_TEXT = [
    ROOT / "README.md",
    ROOT / "outputs" / "README.md",
    ROOT / "bench" / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
]
CONFIG_NAMES = {
    "train.py": "train",
    "evaluate.py": "evaluate",
    "runtime.slurm": "train",
    "evaluation.preferences": "preferences",
}
# words a reader of this project knows without a gloss, and names (of models, venues, files, classes)
PLAIN = {
    "API",
    "CI",
    "CIs",
    "CPU",
    "CPUs",
    "CSV",
    "CUDA",
    "GB",
    "GPU",
    "GPUs",
    "JSON",
    "JSONL",
    "README",
    "TXT",
    "URL",
    "UTF",
    "YAML",
    "YAMLs",
    "SIGINT",
    "SIGKILL",
    "TORCH",
    "DEVELOPERS",
    "MODULE",
    "SUPPORTS",
    "LESS",
    "OTHER",
    "TEXT",
    "TEACHER",
    "STUDENT",
    "LABEL",
    "GPT",
    "OPT",
    "XL",
    "BLOOM",
    "LFM2",
    "ICLR",
    "EMNLP",
    "CIKM",
    "V3",
    "AG",
    "OSS",
    "H1",
    "A1",
    "A2",
    "MLPs",
    "LLMs",
    "GELU",
}
MACHINE_WORDS = re.compile(
    r"\.\./shared|shared/data|\bthis (2-core |shared )?(CPU )?machine\b|\bthis (2-core )?CPU\b"
    r"|\bshared machine\b"
)


def inline_commands(path: Path) -> list[str]:
    """The `python ...` commands written inline (in backticks) in `path`'s prose."""
    prose = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return [span for span in re.findall(r"`(python [^`]+)`", prose.replace("\n", " "))]


def fenced_commands(path: Path) -> list[str]:
    return [
        " ".join(without_comment(line).split())
        for block in FENCE.findall(path.read_text())
        for line in block.replace("\\\n", " ").splitlines()
        if without_comment(line).strip()
    ]


def filled(words: list[str]) -> list[str]:
    """Placeholders in a value (`ckpt=<run dir>`) given a stand-in value, those standing for whole words
    (`<overrides>`, `...`) left out, so the rest can be parsed."""
    return [
        re.sub(r"<[^>]+>", "x", word)
        for word in words
        if word != "..." and not re.fullmatch(r"<[^>]+>", word)
    ]


def first_of_sweeps(overrides: list[str]) -> list[str]:
    """A `-m` command's overrides with each swept key at its first value (one job's config)."""
    parsed = OverridesParser.create().parse_overrides(overrides)  # an unquoted `{a: b}` fails here
    return [
        f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
        if o.is_sweep_override()
        else o.input_line
        for o in parsed
    ]


def written_by_the_page(error: Exception, page: str) -> bool:
    """Whether a config option the command names is one the page's own worked example writes
    (`conf/<group>/<name>.yaml`)."""
    missing = re.search(r"Could not find '(\w+)/(\w+)'", str(error))
    return bool(missing) and f"conf/{missing[1]}/{missing[2]}.yaml" in page


def check_command(command: str, page: str = "") -> None:
    """Shell words; a Hydra entrypoint's overrides through Hydra's parser and config composition (a config the
    `page` itself writes may be missing); another script's `--options` present in its source, a module
    importable."""
    spaced = re.sub(r"<([^<>]*)>", lambda m: "<" + m[1].replace(" ", "_") + ">", command)  # `<run dir>`
    words = filled(shlex.split(spaced))
    assert words[0] == "python", command
    if words[1].startswith("-") and words[1] != "-m":  # the interpreter's own options (-c, -X): no program
        return
    program, rest = (words[2], words[3:]) if words[1] == "-m" else (words[1], words[2:])
    if program in HYDRA_ENTRYPOINTS:
        overrides = first_of_sweeps([word for word in rest if not word.startswith("-")])  # not -m, --help
        name = CONFIG_NAMES.get(program) or program.removeprefix("analysis.")
        try:
            compose_config(
                *[o for o in overrides if not o.startswith(("hydra.", "hydra/"))], config_name=name
            )
        except Exception as error:
            if not written_by_the_page(error, page):
                raise
        return
    module_file = program.replace(".", "/") + ".py"
    if not program.endswith(".py") and not (ROOT / module_file).exists():
        written = module_file in page  # a module the page's own example writes
        assert written or importlib.util.find_spec(program), f"{command}: no module {program}"
        return
    source = ROOT / program if program.endswith(".py") else ROOT / (program.replace(".", "/") + ".py")
    assert source.exists(), f"{command}: no {source.relative_to(ROOT)}"
    text = source.read_text() + "".join(p.read_text() for p in (ROOT / "bench" / "helpers").glob("*.py"))
    for option in [word.split("=")[0] for word in rest if word.startswith("--")]:
        assert f'"{option}"' in text, f"{command}: {source.relative_to(ROOT)} has no option {option}"


@pytest.mark.parametrize("path", USER_TEXT, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_inline_command_parses_and_composes(path: Path) -> None:
    commands = inline_commands(path) + (fenced_commands(path) if path.parent.name == "bench" else [])
    for command in commands:
        if command.startswith("python"):
            check_command(command, path.read_text())


def test_an_unquoted_mapping_fails_the_check() -> None:
    with pytest.raises(Exception, match="(?i)no viable|mismatched|extraneous|parse"):
        check_command("python train.py task=reverse task.data_files={train: r.jsonl, test: r.jsonl}")
    check_command("python train.py task=gsm8k 'task.data_files={train: r.jsonl, test: r.jsonl}'")


@pytest.mark.parametrize("path", USER_TEXT + sorted((ROOT / "conf").rglob("*.yaml")), ids=str)
def test_no_user_facing_text_speaks_of_the_machine_it_was_written_on(path: Path) -> None:
    found = [m.group(0) for m in MACHINE_WORDS.finditer(path.read_text())]
    assert not found, f"{path.relative_to(ROOT)}: {found}"


def test_every_abbreviation_the_docs_use_is_in_the_glossary() -> None:
    glossary = (ROOT / "docs" / "glossary.md").read_text()
    defined = {
        word for row in re.findall(r"^\| ([^|]+) \|", glossary, re.M) for word in re.split(r",\s*", row)
    }
    defined |= {word.split()[0] for word in defined}
    prose = " ".join(FENCE.sub("", path.read_text()) for path in USER_TEXT if path.parent.name != "bench")
    used = set(re.findall(r"\b[A-Z][A-Z0-9]{1,}[a-z]?\b", prose))
    missing = sorted(used - defined - PLAIN)
    assert not missing, f"abbreviations without a glossary entry (docs/glossary.md): {missing}"


def outputs_table() -> dict[str, dict[str, str]]:
    """docs/outputs.md's table: entrypoint -> its row's cells."""
    text = (ROOT / "docs" / "outputs.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 6 and cells[0].startswith("`python"):
            rows[cells[0].strip("`").split()[-1]] = dict(
                zip(("run_dir", "sweep_dir", "log", "logger", "writes"), cells[1:], strict=True)
            )
    return rows


def pattern(value: str, raw: dict) -> str:
    """A run-dir setting as the docs write it: `${task.name}` -> `<task>`, the time -> `<time>`."""
    value = re.sub(r"\$\{unique_dir:(.*)\}$", r"\1", value)
    value = re.sub(r"\$\{now:[^}]*\}", "<time>", value)
    value = value.replace("${run_path}", str(raw.get("run_path"))).replace("${kind}", str(raw.get("kind")))
    for key in ("task", "model", "method", "study"):
        value = value.replace("${" + key + ".name}", f"<{key}>")
    return value


ENTRYPOINTS = [
    "train.py",
    "evaluate.py",
    *[f"analysis.{k}" for k in ("attention", "causal", "gradsim", "ripple", "memit")],
    "evaluation.preferences",
]


@pytest.mark.parametrize("entrypoint", [*ENTRYPOINTS, "analysis.noise_study"])
def test_outputs_table_is_what_the_configs_compose(entrypoint: str) -> None:
    row = outputs_table()[entrypoint]
    name = CONFIG_NAMES.get(entrypoint) or entrypoint.removeprefix("analysis.")
    cfg = compose_config(config_name=name, hydra_config=True)
    raw = OmegaConf.to_container(cfg, resolve=False)
    assert row["run_dir"] == f"`{pattern(raw['hydra']['run']['dir'], raw)}/`"
    assert row["sweep_dir"] == f"`{pattern(raw['hydra']['sweep']['dir'], raw)}/`"
    assert row["log"] == f"`{entrypoint.removesuffix('.py').rsplit('.', 1)[-1]}.log`"
    loggers = sorted(cfg.get("logger") or {})
    documented = [] if row["logger"].startswith("none") else sorted(re.findall(r"`(\w+)`", row["logger"]))
    assert documented == loggers, (row["logger"], loggers)


def test_a_bare_runs_defaults_are_the_composed_ones() -> None:
    cfg = compose_config()
    table = (ROOT / "docs" / "outputs.md").read_text().split("## A bare `python train.py`")[1].split("##")[0]
    settings = dict(re.findall(r"`([\w.]+)=([^`]+)`", table))
    assert settings, "no `key=value` in the defaults table"
    for key, value in settings.items():
        composed = OmegaConf.select(cfg, key)
        if key in ("model", "task", "method", "logger"):
            composed = {"model": cfg.model.name, "task": cfg.task.name, "method": cfg.method.name}.get(
                key, "wandb"
            )
        assert str(composed) == value, f"docs/outputs.md says {key}={value}, the config composes {composed}"
