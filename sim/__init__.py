"""Discrete-event simulator of LLM serving deployments; runs on CPU from the shipped data."""
