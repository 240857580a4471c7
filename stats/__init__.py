"""Numbers with their uncertainty, below every other layer (it imports nothing of lmlab's, so evaluation,
analysis, sweeps and reports all use it): intervals, paired tests, Holm and verdicts (estimates.py),
statistics over seeds (seed_statistics.py), per-item ids, clusters and intervals (item_scores.py), paired
comparison tables (comparisons.py) and CSV / markdown tables (tables.py). What reads run directories stays
above: evaluation/."""
