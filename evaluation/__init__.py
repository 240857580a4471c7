"""What evaluate.py does, without Lightning: the evaluation run (evaluate.py), the model each process scores
with (loaded.py, from runtime.saved_run's resolved `RunModel`), the scorers by a task's `evaluation_kind`
(scorers/: generation.py, classification.py) and the LLM judge (judge.py), the generation backends (lmlab's
modeling.generation, vLLM: vllm_backend.py), data-parallel evaluation (data_parallel.py), the per-item
outcomes file (predictions.py) and the grid report of a `-m` sweep (task_grid.py).

May import: stats, datamodules (tasks), modeling, runtime (sessions, saved runs); never lightning,
lightning_modules or analysis."""
