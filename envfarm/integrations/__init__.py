"""Adapters from envfarm to other RL libraries' vector-env APIs, each behind its own extra."""
