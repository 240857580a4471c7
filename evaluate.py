"""Evaluate a model on a task's test split: `python evaluate.py model=<m> task=<t> [ckpt=<dir>]`."""

import hydra
from omegaconf import DictConfig

from evaluation.evaluate import run
from runtime.session import optimized_value


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    """Hydra entrypoint; returns `optimized_metric` (default the task's headline metric: flexible Pass@1,
    accuracy, BLEU) for sweepers."""
    results = run(cfg)
    return optimized_value(results, results["optimized_metric"])


if __name__ == "__main__":
    main()
