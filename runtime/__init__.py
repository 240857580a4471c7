"""Run plumbing shared by the entrypoints: the run lifecycle, config checks, loggers, strategies, results
files.

Config resolvers: `${unique_dir:<path>}` (run dirs no two runs share), `${run_group:<default>}` (the W&B
group: the sweep dir in a `-m` run) and `${metric_direction:<metric>}` (minimize / maximize, for sweepers).
"""

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
