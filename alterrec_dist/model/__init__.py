"""The networks of AlterRec and its baselines: dense, replicated, and unaware of ranks (no torch.distributed)."""
