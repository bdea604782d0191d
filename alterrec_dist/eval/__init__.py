"""Ranking metrics and the sharded full-ranking loop that training and serving share."""
