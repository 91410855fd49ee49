"""Experiment configs: data only (``common.py`` + one file per experiment)."""
