"""Fake vLLM: only the modules opcast's kernels import (see tests/fakes/__init__.py)."""
__version__ = "0.0.0+fake"
