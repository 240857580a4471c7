"""Fine-tune or pre-train a model: `python train.py model=<m> task=<t> method=<x> [key=value ...]`."""

import hydra
from omegaconf import DictConfig

from runtime.session import optimized_value
from runtime.training import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """Hydra entrypoint; returns `optimized_metric` (default val/loss) for sweepers."""
    results = run(cfg)
    return optimized_value(results, results["optimized_metric"])


if __name__ == "__main__":
    main()
