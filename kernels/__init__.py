"""Real operator kernels, one small module per family. Each builds inputs for a shape on a device
and returns a zero-argument callable that launches the kernel. torch is imported lazily.

- ``matmul``: GEMMs as linear layers run them (torch.matmul -> cuBLAS on GPU, oneDNN/BLAS on CPU)
- ``attention``: prefill chunks and decode; backends sdpa (CPU/GPU), flash_attn, vllm (CUDA only)
- ``norms`` (RMSNorm, LayerNorm), ``activation`` (SiLU*mul, GELU), ``rope``: torch, or vLLM's
  fused CUDA ops when installed
- ``elementwise``: residual add, embedding lookup
- ``collectives``: torch.distributed all_reduce and send/recv ping-pong (NCCL on GPU, gloo on CPU)
- ``backends``: which of these libraries this machine has, and the error that says what to install
"""
