"""The run lifecycle, shared by the entrypoints: sessions (session.py: run dir, config, seed, loggers,
results.json, W&B finish), checkpoints and RNG state (checkpointing.py, rng_state.py), run dirs (run_dir.py),
loggers and W&B (loggers.py, wandb_runs.py, wandb_offline.py), strategies (strategies.py), throughput
(throughput.py), the training run (training.py), config checks (validate.py), results files (results.py),
saved runs (saved_run.py: what train.py and analysis.memit write, resolved once by the entrypoints that take
ckpt=; export.py: one as a standalone transformers model), SLURM (slurm.py) and a sweep's bookkeeping
(sweeps.py). Nothing here scores, serves or reports: evaluation/ and stats/ do.

May import: stats, datamodules, modeling, lightning_modules; never evaluation or analysis.

Config resolvers: `${unique_dir:<path>}` (run dirs no two runs share), `${run_group:<default>}` (the W&B
group: the sweep dir in a `-m` run) and `${metric_direction:<metric>}` (minimize / maximize, for sweepers)."""

from omegaconf import OmegaConf

from runtime.run_dir import create_unique_dir
from runtime.session import metric_direction
from runtime.wandb_runs import run_group

for _name, _resolver, _cached in (
    ("unique_dir", create_unique_dir, True),
    ("run_group", run_group, False),
    ("metric_direction", metric_direction, False),
):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver, use_cache=_cached)
