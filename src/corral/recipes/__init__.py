"""Recipes: turn a field's own inputs (NeuroConv specs, BIDS datasets, sorting sweeps) into items and stages."""
