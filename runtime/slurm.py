"""The sbatch script a SLURM sweep would submit, written without submitting anything.

    python -m runtime.slurm model=llama2_13b trainer=fsdp trainer.devices=8 trainer.num_nodes=2 method=lora

composes train.py's config with `hydra/launcher=submitit_slurm` (conf/hydra/launcher/submitit_slurm.yaml) and
prints the script that Hydra's submitit launcher would hand to `sbatch`: submitit's own SLURM executor and
script writer, given the same launcher parameters the same way (hydra_submitit_launcher's `launch`), so what
it prints is what runs. It works on any machine: no `srun` is needed to prepare a submission.
"""

from __future__ import annotations

import sys
import tempfile

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from submitit import AutoExecutor
from submitit.slurm.slurm import SlurmExecutor

from modeling.models import CONF_DIR

INIT_KEYS = {"submitit_folder", "max_num_timeout"}  # executor constructor arguments in the launcher


class _ScriptOnlySlurmExecutor(SlurmExecutor):
    """submitit's SLURM executor for writing the script only: submitit refuses to build one where `srun` is
    missing, and a submission is prepared on any machine, so this one never looks for it (it never
    submits)."""

    @classmethod
    def affinity(cls) -> int:
        return 1


def sbatch_script(launcher: DictConfig, command: str = "python train.py") -> str:
    """The sbatch file text for a job array of the SLURM launcher config `launcher` (hydra.launcher): as
    submitit's AutoExecutor passes them, unset (None) parameters dropped, the generic ones converted to
    SLURM's names, the others as they are."""
    params = {
        k: v
        for k, v in OmegaConf.to_container(launcher, resolve=True).items()
        if k != "_target_" and v is not None
    }
    executor = _ScriptOnlySlurmExecutor(
        folder=params["submitit_folder"], max_num_timeout=params.get("max_num_timeout", 0)
    )
    generic = set(AutoExecutor._typed_parameters())
    executor.update_parameters(
        **executor._convert_parameters({k: v for k, v in params.items() if k in generic}),
        **{k: v for k, v in params.items() if k not in generic | INIT_KEYS},
    )
    return executor._make_submission_file_text(command, "sweep")


def main(overrides: list[str]) -> str:
    """The script for train.py with `overrides` (the launcher group is set to submitit_slurm)."""
    with tempfile.TemporaryDirectory() as folder, initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "hydra/launcher=submitit_slurm",
                f"hydra.sweep.dir={folder}",
                "hydra.job.name=train",
                *overrides,
            ],
            return_hydra_config=True,
        )
        return sbatch_script(cfg.hydra.launcher)


if __name__ == "__main__":
    print(main(sys.argv[1:]))
