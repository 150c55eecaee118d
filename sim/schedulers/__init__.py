"""Replica schedulers by config name (``scheduler.name``); see common.py for the contract."""
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
