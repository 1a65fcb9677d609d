"""Bayesian deep-learning and optimisation recipes built on `matfree_lstsq`.

Import as `from matfree_lstsq import applications as mfa`. Every recipe is a thin
consumer of the core's public API (`matfree_lstsq.lstsq` and its solvers).
"""
