"""README's first steps, run in order as a new user would: the demo, evaluating what it trained, resuming it,
a sweep (on a fresh clone, nothing beside it)."""

from __future__ import annotations

import subprocess

from runtime.results import read_results
from tests import docs_promises as promise
from tests.docs_workspace import Workspace


def resumed_demo(workspace: Workspace, result: subprocess.CompletedProcess) -> None:
    """A second demo run dir, continued from the first one's last checkpoint (step 2 of 2)."""
    runs = sorted(workspace.root.glob("outputs/gsm8k/smollm2_135m-lora/*/results.json"))
    assert len(runs) == 2 and read_results(runs[-1].parent)["global_step"] == 2
    assert "Restoring states from the checkpoint" in result.stdout + result.stderr


SCENARIOS = {
    "new_user": [
        ("make demo", promise.demo_prints_its_results),
        (
            "python evaluate.py task.source=bundled ckpt=<run dir>",
            promise.evaluated("outputs/eval/gsm8k/*/*", "sft", "smollm2_135m"),
        ),
        ("python train.py experiment=demo ckpt_path=<run dir>/checkpoints/last.ckpt", resumed_demo),
        (
            "python train.py -m optim.lr=1e-4,3e-4 data.batch_size=4,8",
            promise.swept("multirun/gsm8k/*", 4, "summary.csv", "summary.md", "sweep.png"),
        ),
    ]
}
