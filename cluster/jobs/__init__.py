"""Ray job entrypoints for data scientists: `python -m cluster.jobs.NAME --help` (see common.py)."""
