"""The kernels compute what the operators compute (so the profiler times the real thing), and
backend detection fails with a line that says what to install."""
import math

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from conf import ConfigError  # noqa: E402
from kernels import activation, attention, elementwise, matmul, norms, rope  # noqa: E402
from kernels.backends import require, resolve  # noqa: E402

CPU, F32 = torch.device("cpu"), torch.float32


def _captured(fn) -> dict:
    """The tensors a launcher closes over, by variable name."""
    return {n: c.cell_contents for n, c in zip(fn.__code__.co_freevars, fn.__closure__)}


def test_matmul_is_a_linear_layer():
    fn = matmul.build(5, 7, 3, F32, CPU)
    t = _captured(fn)
    x, w_t, out = t["x"], t["weight_t"], t["out"]
    assert out.shape == (5, 7) and w_t.shape == (3, 7)
    assert torch.allclose(fn(), x @ w_t)


def test_norms_and_activations_match_their_formulas():
    fn = norms.build("rmsnorm", 4, 8, F32, CPU)
    x = _captured(fn)["x"]
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norms.EPS)
    assert torch.allclose(fn(), ref, atol=1e-5)
    fn = activation.build("silu_mul", 3, 6, F32, CPU)
    x = _captured(fn)["x"]
    assert x.shape == (3, 12)
    assert torch.allclose(fn(), F.silu(x[:, :6]) * x[:, 6:])
    assert activation.build("gelu", 3, 6, F32, CPU)().shape == (3, 6)
    assert norms.build("layernorm", 4, 8, F32, CPU)().shape == (4, 8)
    with pytest.raises(ValueError):
        activation.build("relu", 3, 6, F32, CPU)


def test_rope_rotates_pairs_like_complex_multiplication():
    fn = rope.build(5, 2, 1, 8, 0, F32, CPU, max_position=16)
    q = _captured(fn)["q"]
    qr, kr = fn()
    assert qr.shape == (5, 2, 8) and kr.shape == (5, 1, 8)
    # NeoX layout: element i pairs with i + d/2; position p rotates pair j by p * theta^(-2j/d)
    qv = q.view(5, 2, 8)
    z = torch.complex(qv[..., :4], qv[..., 4:])
    pos = torch.arange(5, dtype=F32)[:, None, None]
    ang = pos * 10000.0 ** (-torch.arange(0, 8, 2, dtype=F32) / 8)
    rz = z * torch.polar(torch.ones_like(ang), ang)
    assert torch.allclose(qr, torch.cat([rz.real, rz.imag], -1), atol=1e-5)
    assert torch.allclose(qr.norm(dim=-1), qv.norm(dim=-1), atol=1e-4)   # rotation keeps length


def test_sdpa_chunked_prefill_attends_to_its_prefix_causally():
    b, q_len, kv_len, nq, nkv, d = 2, 3, 7, 4, 2, 8
    fn = attention.build("sdpa", b, q_len, kv_len, nq, nkv, d, 16, F32, CPU)
    t = _captured(fn)
    q, k, v = t["q"], t["k"], t["v"]
    out = fn()
    kk, vv = k.repeat_interleave(nq // nkv, 1), v.repeat_interleave(nq // nkv, 1)
    scores = q @ kk.transpose(-1, -2) / math.sqrt(d)
    qpos = torch.arange(kv_len - q_len, kv_len)[:, None]
    scores = scores.masked_fill(torch.arange(kv_len)[None, :] > qpos, float("-inf"))
    assert torch.allclose(out, scores.softmax(-1) @ vv, atol=1e-5)


def test_sdpa_decode_and_full_prefill_shapes():
    assert attention.build("sdpa", 3, 1, 33, 4, 2, 8, 16, F32, CPU)().shape == (3, 4, 1, 8)
    assert attention.build("sdpa", 1, 9, 9, 4, 4, 8, 16, F32, CPU)().shape == (1, 4, 9, 8)
    with pytest.raises(ValueError):
        attention.build("sdpa", 1, 9, 4, 4, 4, 8, 16, F32, CPU)


def test_block_size_records_what_the_backend_pages():
    assert attention.effective_block_size("sdpa", 16) == 0
    assert attention.effective_block_size("vllm", 16) == 16
    assert attention.effective_block_size("flash_attn", 16) == 0      # FA2 pages only in 256-multiples
    assert attention.effective_block_size("flash_attn", 256) == 256


def test_add_and_embedding():
    fn = elementwise.build_add(4, 8, F32, CPU)
    x, r = _captured(fn)["x"], _captured(fn)["residual"]
    assert torch.equal(fn(), x + r)
    assert elementwise.build_embedding(6, 8, 100, F32, CPU)().shape == (6, 8)


def test_missing_or_cuda_only_backend_is_a_clear_error():
    with pytest.raises(ConfigError, match="only on CUDA"):
        require("flash_attn", "cpu")
    with pytest.raises(ConfigError, match="unknown backend"):
        require("tensorrt", "cuda")
    assert resolve("auto", attention.PREFERRED["cpu"], "cpu") == "sdpa"
    if not __import__("importlib").util.find_spec("flash_attn"):
        with pytest.raises(ConfigError, match="pip install flash-attn"):
            require("flash_attn", "cuda")
