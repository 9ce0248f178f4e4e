"""Metrics (and the files the workers share them through), JSON logs, traces."""
