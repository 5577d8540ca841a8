"""Capacity planning: what a run will need, predicted before it starts."""
