"""Entrypoints that study a model rather than train it (`python -m analysis.<name>`), without Lightning:
attention maps and allocation (attention.py), GradSim (gradsim.py), MEMIT edits (memit.py) and the ripple
study (ripple.py, ripple_compare.py), the noise study (noise_study.py), paired comparisons of evaluation runs
(compare.py) and ablation reports (ablation.py); their figures are figures/analysis.py. An analysis takes a
model through runtime.saved_run (any ckpt= run) and a task (datamodules.task), never a DataModule.

May import every layer below it (stats, figures, datamodules, modeling, runtime, evaluation); never lightning
or lightning_modules."""
