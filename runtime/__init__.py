"""Run plumbing shared by the entrypoints: config checks, loggers, strategies, results files."""

from runtime.run_dir import register_resolver

register_resolver()
