"""The sbatch script a SLURM sweep would submit, written without submitting anything.

    python -m runtime.slurm model=llama2_13b trainer=fsdp trainer.devices=8 trainer.num_nodes=2 method=lora

composes train.py's config with `hydra/launcher=submitit_slurm` (conf/hydra/launcher/submitit_slurm.yaml) and
prints the script that Hydra's submitit launcher would hand to `sbatch`: the same executor, built from the
same launcher parameters the same way (hydra_submitit_launcher's `launch`), so what it prints is what runs.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
INIT_KEYS = {"submitit_folder", "max_num_timeout"}  # executor constructor arguments in the launcher


def sbatch_script(launcher: DictConfig, command: str = "python train.py") -> str:
    """The sbatch file text for a job array of the SLURM launcher config `launcher` (hydra.launcher). submitit
    needs `srun` on the PATH (a SLURM login node) to build it."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    params = {k: v for k, v in OmegaConf.to_container(launcher, resolve=True).items() if k != "_target_"}
    executor = submitit.AutoExecutor(cluster="slurm", folder=params["submitit_folder"],
                                     slurm_max_num_timeout=params.get("max_num_timeout", 0))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items() if k not in INIT_KEYS})
    return executor._executor._make_submission_file_text(command, "sweep")


def main(overrides: list[str]) -> str:
    """The script for train.py with `overrides` (the launcher group is set to submitit_slurm)."""
    with tempfile.TemporaryDirectory() as folder, initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=submitit_slurm", f"hydra.sweep.dir={folder}", "hydra.job.name=train",
                                          *overrides], return_hydra_config=True)
        return sbatch_script(cfg.hydra.launcher)


if __name__ == "__main__":
    print(main(sys.argv[1:]))
