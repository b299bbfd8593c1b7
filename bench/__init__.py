"""Synthetic spuriosity benchmark: world, zero-shot model pretraining, the suite."""
