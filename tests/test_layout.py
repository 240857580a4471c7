"""The layout the design card fixes: its top-level names, the LightningModules in lightning_modules/, imports
that run one way (stats -> datamodules -> modeling -> lightning_modules -> runtime -> evaluation -> analysis
-> entrypoints), runtime/ holding the run lifecycle only, evaluation and analysis without Lightning, and no
file over 300 lines."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import lightning as L

from lightning_modules.task_modules import TASK_MODULES
from tests.conftest import ROOT

DESIGN_CARD_TOP_LEVEL = (
    "pyproject.toml",
    "conf",
    "lightning_modules",
    "datamodules",
    "analysis",
    "train.py",
    "evaluate.py",
    "tests",
    "outputs",
)
# lowest first: a module may import its own layer and the ones before it
LAYERS = (
    "stats",
    "figures",
    "datamodules",
    "modeling",
    "lightning_modules",
    "runtime",
    "evaluation",
    "analysis",
)
# what runtime/ holds: the run lifecycle (docstring of runtime/__init__.py), nothing that scores or reports
RUN_LIFECYCLE = {
    "__init__",
    "checkpointing",
    "export",
    "loggers",
    "results",
    "rng_state",
    "run_dir",
    "saved_run",
    "session",
    "slurm",
    "strategies",
    "sweeps",
    "throughput",
    "training",
    "validate",
    "wandb_offline",
    "wandb_runs",
}
ENTRYPOINTS = ("train.py", "evaluate.py")
MAX_LINES = 300


def imported_names(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in `tree`, inside functions too, and of every string constant that
    is a dotted path into a layer (what `get_method` or `import_module` would import)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            head, _, rest = node.value.partition(".")
            if head in LAYERS and rest and all(part.isidentifier() for part in rest.split(".")):
                found.append((node.lineno, node.value))
    return found


def layer_of(path: Path, root: Path) -> int:
    """The rank of the layer a file belongs to (entrypoints above every layer)."""
    top = path.relative_to(root).parts[0]
    return LAYERS.index(top) if top in LAYERS else len(LAYERS)


def upward_imports(root: Path) -> list[str]:
    """`file:line imports name` for every import from a layer above the importing file's."""
    files = [path for layer in LAYERS for path in sorted((root / layer).rglob("*.py"))]
    files += [root / name for name in ENTRYPOINTS]
    found = []
    for path in files:
        for line, name in imported_names(ast.parse(path.read_text(), str(path))):
            target = name.split(".")[0]
            if target in LAYERS and LAYERS.index(target) > layer_of(path, root):
                found.append(f"{path.relative_to(root)}:{line} imports {name}")
    return found


def tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / name for name in listed.stdout.split()]


def test_every_name_on_the_design_card_top_level_exists() -> None:
    missing = [name for name in DESIGN_CARD_TOP_LEVEL if not (ROOT / name).exists()]
    assert not missing
    assert (ROOT / "lightning_modules" / "base.py").is_file() and (
        ROOT / "lightning_modules" / "methods"
    ).is_dir()


def test_every_package_of_the_project_is_installed() -> None:
    """pyproject.toml lists every package (a folder with __init__.py) but the tests: an installed lmlab, run
    from outside the repository, imports them all (runtime imports figures, the entrypoints evaluation)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(path.parent.relative_to(ROOT).parts)
        for path in tracked_files()
        if path.name == "__init__.py" and path.parts[len(ROOT.parts)] != "tests"
    }
    assert found == listed


def test_the_lightning_modules_live_in_lightning_modules() -> None:
    for name, module_class in TASK_MODULES.items():
        assert issubclass(module_class, L.LightningModule)
        assert module_class.__module__.startswith("lightning_modules."), name
    defined_elsewhere = [
        f"{path.relative_to(ROOT)}: class {node.name}"
        for layer in LAYERS
        if layer != "lightning_modules"
        for path in (ROOT / layer).rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef)
        and any(ast.unparse(base).endswith("LightningModule") for base in node.bases)
    ]
    assert not defined_elsewhere
    assert "lightning" not in {
        name.split(".")[0]
        for path in (ROOT / "modeling").rglob("*.py")
        for _, name in imported_names(ast.parse(path.read_text()))
    }  # the model side runs without Lightning


def test_imports_run_one_way() -> None:
    assert upward_imports(ROOT) == []


def test_the_import_check_catches_a_planted_lazy_upward_import(tmp_path: Path) -> None:
    for name in (*LAYERS, *ENTRYPOINTS):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, tmp_path / name)
    generation = tmp_path / "modeling" / "generation.py"
    lines = generation.read_text().splitlines()
    first_def = next(i for i, line in enumerate(lines) if line.startswith("def "))
    body = next(
        i for i in range(first_def, len(lines)) if lines[i].startswith("    ") and '"""' not in lines[i]
    )
    lines.insert(body, "    from evaluation.evaluate import scorer  # planted")
    generation.write_text("\n".join(lines) + "\n")
    (tmp_path / "datamodules" / "planted.py").write_text('SCORER = "analysis.compare.main"\n')
    (tmp_path / "stats" / "planted.py").write_text("from runtime.results import read_results\n")
    assert upward_imports(tmp_path) == [
        "stats/planted.py:1 imports runtime.results",
        "datamodules/planted.py:1 imports analysis.compare.main",
        f"modeling/generation.py:{body + 1} imports evaluation.evaluate",
    ]


def test_runtime_holds_the_run_lifecycle_only() -> None:
    assert {path.stem for path in (ROOT / "runtime").glob("*.py")} <= RUN_LIFECYCLE


def test_evaluation_and_analysis_import_no_lightning() -> None:
    importing = [
        f"{path.relative_to(ROOT)}:{line}"
        for package in ("evaluation", "analysis")
        for path in sorted((ROOT / package).rglob("*.py"))
        for line, name in imported_names(ast.parse(path.read_text()))
        if name.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_modules")
    ]
    assert importing == []


def test_no_project_file_is_over_300_lines() -> None:
    long = {
        str(path.relative_to(ROOT)): count
        for path in tracked_files()
        if path.suffix in (".py", ".yaml", ".toml", ".sh")
        and path.exists()
        and (count := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_figures_are_drawn_in_one_package() -> None:
    """Only figures/ imports matplotlib or asks for pyplot."""
    drawing = []
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")) if layer != "figures" else []:
            tree = ast.parse(path.read_text())
            drawing += [
                f"{path.relative_to(ROOT)}:{line} imports {name}"
                for line, name in imported_names(tree)
                if name.split(".")[0] == "matplotlib"
            ]
            drawing += [
                f"{path.relative_to(ROOT)}:{node.lineno} calls pyplot()"
                for node in ast.walk(tree)
                if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("pyplot")
            ]
    assert drawing == []
