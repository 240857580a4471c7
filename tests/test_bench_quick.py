"""Every bench script's quick mode (bench/helpers/quick.py: a tiny model, a step or two, one round, the
script's own code path with its side processes forked) runs here, so a script that breaks fails the suite,
not the next `make bench`. Each run ends with the ratio lines its docstring promises, every one a number (nan
only where an optional package is missing and the script says so), and where a script's comparison is exact
(the same completions, losses or weights on both sides) it holds. bench/methods.py and bench/gpu_check.py
have tests of their own (OWN_TESTS)."""

from __future__ import annotations

import ast
import math
import re

import pytest

from tests.conftest import ROOT, launch

BENCH = ROOT / "bench"
OWN_TESTS = {"methods": "test_bench_methods.py", "gpu_check": "test_gpu_check.py"}
SCRIPTS = sorted(path.stem for path in BENCH.glob("*.py") if path.stem not in OWN_TESTS)
SEVERAL_PROCESSES = {"fsdp_vs_ddp", "eval_data_parallel"}  # each side starts two processes
RATIO = re.compile(r"^ratio (\w+) = (\S+) \(goal (>=|<=) [\d.]+\)$", re.M)

# what each script compares exactly, as it prints it (a pattern that must match)
EXACT = {
    "attention_memory": [r"same attention rows: True"],
    "causal_trace": [r"max \|effect difference\| on tiny = \d\.\d\de-(0[5-9]|[1-9]\d)\n"],  # below 1e-4
    "eval_data_parallel": [r"identical completions: (\d+)/\1\n"],
    "eval_prefix_cache": [r"identical completions (\d+)/\1\n"],
    "eval_resume": [r"round 0: 2 appends"],  # one per problem
    "eval_throughput": [r"identical completions: (\d+)/\1\n"],
    "eval_vllm": [r"identical completions: (\d+)/\1\n"],
    "eval_vs_lm_eval": [r"identical prompts: (\d+)/\1\n"],
    "fault_tolerance": [r"ratio exact_resume_share = 1\.000", r"ratio lost_checkpoint_share = 0\.000"],
    "fsdp_vs_ddp": [r"ratio fsdp_vs_ddp_loss_match = 1\.000"],
    "gradsim": [r"max \|GradSim difference\| = (0\.00e\+00|\d\.\d\de-(0[6-9]|[1-9]\d))\n"],  # below 1e-5
    "sft_throughput": [
        r"ratio padding_free_loss_match = 1\.000",
        r"ratio full_padding_free_loss_match = 1\.000",
    ],
}


def promised_ratios(script: str) -> set[str]:
    """The ratio names the script's docstring lists."""
    docstring = ast.get_docstring(ast.parse((BENCH / f"{script}.py").read_text())) or ""
    return set(re.findall(r"^\s*ratio (\w+) =", docstring, re.M))


@pytest.mark.parametrize(
    "script",
    [
        pytest.param(name, marks=pytest.mark.xdist_group("processes")) if name in SEVERAL_PROCESSES else name
        for name in SCRIPTS
    ],
)
def test_the_bench_script_runs_in_its_quick_mode_and_ends_with_its_ratios(script: str) -> None:
    output = launch(f"bench/{script}.py", "--quick").stdout
    printed = {name: float(value) for name, value, _ in RATIO.findall(output)}
    assert promised_ratios(script) <= set(printed), output[-3000:]
    lines = output.rstrip().splitlines()
    assert all(line.startswith("ratio ") for line in lines[-len(printed) :]), output[-3000:]
    for name, value in printed.items():
        assert math.isfinite(value) or (math.isnan(value) and "not installed" in output), (name, value)
    for pattern in EXACT.get(script, []):
        assert re.search(pattern, output), (pattern, output[-3000:])


def test_every_bench_script_parses_and_documents_its_quick_mode_and_a_make_target_runs_it() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for path in BENCH.glob("*.py"):
        text = path.read_text()
        assert f"python bench/{path.name} --quick" in text, path.name
        assert re.search(r"\.parse\(\s*parser", text), f"bench/{path.name} does not parse with quick.parse"
        assert f"bench/{path.name}" in makefile, f"no make target runs bench/{path.name}"
    assert all((ROOT / "tests" / test).exists() for test in OWN_TESTS.values())
