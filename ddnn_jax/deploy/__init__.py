"""Deploying a trained run: loading it at any depth (``trained_run``), BatchNorm
recalibration, latency, evaluation rows and Pareto fronts, the depth search, confidence
cascades (``early_exit``, ``cascade_choice``), exported artifacts and ``DynamicModel``.
It imports ``core``, ``cpu``, ``nn``, ``data`` and ``training``, never ``studies``.
"""
