"""Evaluation: metrics, baselines and reports for restoration."""
