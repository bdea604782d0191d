"""Experiment grids: the runner (methods x datasets x seeds through the normal driver) and the report."""
