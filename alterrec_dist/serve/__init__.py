"""Serving a trained model on one process: the scoring model (from a run or an export), queries, exact scoring, search and batch scoring."""
