"""Experiments: one module per claim of the BN lecture, each runnable alone."""
