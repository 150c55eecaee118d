"""The sampler (``sampler``): logits [sequences, vocab] -> one next token per sequence, the way
vLLM v1's Sampler does it for the default request (temperature sampling, no top-k/top-p, no
penalties, no logprobs; vllm/v1/sample/sampler.py): logits to fp32 and divided by the
temperature, softmax, then ``probs / Exponential(1)`` argmax (the exponential-race sampling trick
vLLM uses instead of a multinomial draw). It runs eagerly, outside vLLM's compiled model."""
from __future__ import annotations

from kernels.backends import randn

TEMPERATURE = 0.8     # any non-greedy value takes the same path


def sample_native(logits, temperature):
    import torch
    scaled = logits.to(torch.float32)
    scaled.div_(temperature.unsqueeze(1))
    probs = torch.softmax(scaled, dim=-1, dtype=torch.float32)
    q = torch.empty_like(probs).exponential_()
    return probs.div_(q).argmax(dim=-1).view(-1).to(torch.int32)


def build(num_seqs: int, vocab_size: int, dtype, device):
    import torch
    logits = randn((num_seqs, vocab_size), dtype, device)
    temperature = torch.full((num_seqs,), TEMPERATURE, dtype=torch.float32, device=device)
    return lambda: sample_native(logits, temperature)
