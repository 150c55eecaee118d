"""Replica schedulers by config name (``scheduler.name``); see common.py for the contract."""
from conf import ConfigError
from sim.schedulers.faster_transformer import FasterTransformerScheduler
from sim.schedulers.lightllm import LightLLMScheduler
from sim.schedulers.orca import OrcaScheduler
from sim.schedulers.sarathi import SarathiScheduler
from sim.schedulers.vllm import VllmScheduler
from sim.schedulers.vllm_v1 import VllmV1Scheduler

SCHEDULERS = {
    "vllm": VllmScheduler,
    "vllm_v1": VllmV1Scheduler,
    "orca": OrcaScheduler,
    "faster_transformer": FasterTransformerScheduler,
    "lightllm": LightLLMScheduler,
    "sarathi": SarathiScheduler,
}


def require(name: str, flag: str, setting: str, feature: str) -> None:
    """One ConfigError line unless scheduler ``name`` runs ``feature`` (its class sets ``flag``)."""
    if not getattr(SCHEDULERS.get(name), flag, False):
        runs = sorted(n for n, s in SCHEDULERS.items() if getattr(s, flag, False))
        raise ConfigError(f"{setting}: opcast models {feature} for scheduler={'/'.join(runs)} (vLLM's V1 "
                          f"engine) only, not scheduler={name}")
