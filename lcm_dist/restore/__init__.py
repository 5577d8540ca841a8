"""Restoration with a trained model: degradations and fitting a fresh phi per image."""
