"""Real operator kernels, one small module per family. Each builds inputs for a shape on a device
and returns a zero-argument callable that launches the kernel. torch is imported lazily.

- ``matmul``: GEMMs as linear layers run them (torch.matmul -> cuBLAS on GPU, oneDNN/BLAS on CPU)
- ``attention``: prefill chunks and decode of ragged batches; backends sdpa (CPU/GPU, never its
  MATH kernel on a GPU), flash_attn, vllm (CUDA only)
- ``norms`` (RMSNorm, LayerNorm, residual add + RMSNorm), ``activation`` (SiLU*mul, GELU),
  ``rope``: torch, torch under torch.compile (vLLM's default), or vLLM's CUDA custom ops
- ``elementwise``: residual add, embedding lookup; ``kv_cache``: the paged KV-cache write
  (vLLM's reshape_and_cache_flash); ``sampler``: logits -> next tokens as vLLM v1 samples
- ``collectives``: torch.distributed all_reduce, all_gather and send/recv ping-pong over subgroups
  (NCCL on GPU, gloo on CPU), and vLLM's custom all-reduce
- ``backends``: which of these libraries this machine has, and the error that says what to install
"""
