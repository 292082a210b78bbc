"""Benchmarks behind `lejepa bench`: each module has run(quick) -> dict, measured against a baseline in one process."""
