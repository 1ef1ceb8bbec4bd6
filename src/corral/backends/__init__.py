"""Backends run a plan's tasks somewhere: ``local`` (default) or ``aws`` (AWS Batch)."""
