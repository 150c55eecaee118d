"""The kernels compute what the operators compute (so the profiler times the real thing), call the
GPU libraries (flash-attn, vLLM) with their real signatures (checked on CPU through the fakes in
tests/fakes), never let SDPA drop to its MATH kernel on a GPU, and backend detection fails with a
line that says what to install."""
import math

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from conf import ConfigError  # noqa: E402
from kernels import activation, attention, elementwise, kv_cache, matmul, norms, rope, sampler  # noqa: E402
from kernels.backends import require, resolve  # noqa: E402
from tests.fakes import fakes, needs_gpu  # noqa: E402,F401  (fakes: a fixture)

CPU, F32, BF16 = torch.device("cpu"), torch.float32, torch.bfloat16


def _captured(fn) -> dict:
    """The tensors a launcher closes over, by variable name."""
    return {n: c.cell_contents for n, c in zip(fn.__code__.co_freevars, fn.__closure__)}


def _ref_attention(q, k, v, q_len, kv_len):
    """Reference: q [b, nq, q_len, d] attends causally (bottom-right) to k/v [b, nkv, kv_len, d]."""
    nq, nkv, d = q.shape[1], k.shape[1], q.shape[-1]
    kk, vv = k.repeat_interleave(nq // nkv, 1), v.repeat_interleave(nq // nkv, 1)
    scores = q @ kk.transpose(-1, -2) / math.sqrt(d)
    qpos = torch.arange(kv_len - q_len, kv_len)[:, None]
    scores = scores.masked_fill(torch.arange(kv_len)[None, :] > qpos, float("-inf"))
    return scores.softmax(-1) @ vv


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
    fn = norms.build("fused_add_rmsnorm", 4, 8, F32, CPU)
    t = _captured(fn)
    out, new_residual = fn()
    s = t["x"] + t["residual"]
    assert torch.allclose(new_residual, s) and torch.allclose(out, s / torch.sqrt(s.pow(2).mean(-1, keepdim=True)
                                                                                  + norms.EPS), atol=1e-5)
    fn = activation.build("silu_mul", 3, 6, F32, CPU)
    x = _captured(fn)["x"]
    assert x.shape == (3, 12)
    assert torch.allclose(fn(), F.silu(x[:, :6]) * x[:, 6:])
    assert activation.build("gelu", 3, 6, F32, CPU)().shape == (3, 6)
    assert norms.build("layernorm", 4, 8, F32, CPU)().shape == (4, 8)
    with pytest.raises(ValueError):
        activation.build("relu", 3, 6, F32, CPU)


def test_compile_backend_runs_the_same_native_ops(monkeypatch):
    """profile.elementwise_backend=compile wraps the torch-native op in torch.compile, once per op
    for every shape (dynamic shapes, as vLLM compiles). Inductor costs ~20 s here: the eager
    torch.compile backend checks the wiring."""
    from kernels import backends
    monkeypatch.setattr(backends, "COMPILE_BACKEND", "eager")
    monkeypatch.setattr(backends, "_COMPILED", {})
    a, b = norms.build("rmsnorm", 4, 8, F32, CPU, "compile"), norms.build("rmsnorm", 9, 8, F32, CPU, "compile")
    assert _captured(a)["fn"] is _captured(b)["fn"]            # one compiled function for all shapes
    x = _captured(a)["x"]
    assert torch.allclose(a(), norms.rms_norm_native(x, torch.ones(8)), atol=1e-6)
    for build in (lambda: activation.build("silu_mul", 3, 6, F32, CPU, "compile"),
                  lambda: rope.build(5, 2, 1, 8, 0, F32, CPU, "compile", max_position=16),
                  lambda: elementwise.build_add(3, 4, F32, CPU, "compile"),
                  lambda: elementwise.build_embedding(3, 4, 10, F32, CPU, backend="compile"),
                  lambda: norms.build("fused_add_rmsnorm", 3, 8, F32, CPU, "compile")):
        build()()


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
    fn = attention.build("sdpa", [q_len] * b, [kv_len] * b, nq, nkv, d, 16, F32, CPU)
    t = _captured(fn)
    assert torch.allclose(fn(), _ref_attention(t["q"], t["k"], t["v"], q_len, kv_len), atol=1e-5)


def test_sdpa_never_uses_the_math_kernel_on_a_gpu(monkeypatch):
    from torch.nn.attention import SDPBackend
    for q_len, kv_len in ((1, 64), (64, 64), (16, 64)):
        for nq, nkv in ((8, 8), (8, 2)):
            for gqa in (True, False):
                plan = attention.sdpa_plan("cuda", q_len, kv_len, nq, nkv, gqa)
                assert SDPBackend.MATH not in plan.backends
                assert not (plan.enable_gqa and plan.mask == "lower_right")   # mask + GQA -> MATH on CUDA
                if plan.mask == "lower_right":
                    assert plan.backends == (SDPBackend.EFFICIENT_ATTENTION,) and plan.repeat_kv == (nq != nkv)
    assert attention.sdpa_plan("cuda", 16, 64, 8, 2, True).mask == "lower_right"
    assert attention.sdpa_plan("cuda", 64, 64, 8, 2, True).enable_gqa       # flash takes GQA with is_causal
    assert attention.sdpa_plan("cpu", 16, 64, 8, 2, True).backends == (SDPBackend.FLASH_ATTENTION,)
    # torch < 2.5 has no enable_gqa: the KV heads are repeated instead
    monkeypatch.setattr(attention, "has_enable_gqa", lambda: False)
    old = attention.sdpa_plan("cpu", 1, 64, 8, 2)
    assert old.repeat_kv and not old.enable_gqa
    fn = attention.build("sdpa", [1, 1], [9, 9], 4, 2, 8, 0, F32, CPU)
    t = _captured(fn)
    assert t["k"].shape[1] == 4 and "enable_gqa" not in t["kw"]
    assert torch.allclose(fn(), _ref_attention(t["q"], t["k"], t["v"], 1, 9), atol=1e-5)


def test_sdpa_gpu_plan_computes_the_same_attention():
    """The CUDA plan for a chunk (repeated KV + lower-right causal bias, mem-efficient kernel) run on
    the CPU (its kernel list swapped for the CPU's) gives the reference attention."""
    from dataclasses import replace
    from torch.nn.attention import SDPBackend
    from torch.nn.attention.bias import causal_lower_right
    plan = attention.sdpa_plan("cuda", 3, 7, 4, 2, True)
    fn = attention._sdpa_call(2, 3, 7, 4, 2, 8, F32, CPU, replace(plan, backends=(SDPBackend.MATH,)))
    t = _captured(fn)
    t["kw"]["attn_mask"] = causal_lower_right(3, 7)      # what the CUDA branch passes
    assert t["k"].shape[1] == 4                          # repeated for the mem-efficient kernel
    assert torch.allclose(fn(), _ref_attention(t["q"], t["k"][:, ::2], t["v"][:, ::2], 3, 7), atol=1e-5)


def test_sdpa_ragged_batch_runs_each_length_once():
    fn = attention.build("sdpa", [1, 1, 1], [5, 9, 9], 4, 2, 8, 0, F32, CPU)
    outs = fn()
    assert [o.shape for o in outs] == [(1, 4, 1, 8), (2, 4, 1, 8)]
    assert attention.build("sdpa", [1] * 3, [33] * 3, 4, 2, 8, 16, F32, CPU)().shape == (3, 4, 1, 8)
    assert attention.build("sdpa", [9], [9], 4, 4, 8, 16, F32, CPU)().shape == (1, 4, 9, 8)
    with pytest.raises(ValueError):
        attention.build("sdpa", [9], [4], 4, 4, 8, 16, F32, CPU)


def test_block_size_records_what_the_backend_pages():
    assert attention.effective_block_size("sdpa", 16) == 0
    assert attention.effective_block_size("vllm", 16) == 16
    assert attention.effective_block_size("flash_attn", 16) == 0      # FA2 pages only in 256-multiples
    assert attention.effective_block_size("flash_attn", 256) == 256


def test_add_embedding_kv_write_and_sampler():
    fn = elementwise.build_add(4, 8, F32, CPU)
    x, r = _captured(fn)["x"], _captured(fn)["residual"]
    assert torch.equal(fn(), x + r)
    assert elementwise.build_embedding(6, 8, 100, F32, CPU)().shape == (6, 8)
    fn = kv_cache.build(37, 2, 8, 16, F32, CPU)
    t = _captured(fn)
    fn()
    slots = t["slot_mapping"]
    assert slots.dtype == torch.int64 and len(set(slots.tolist())) == 37
    assert torch.equal(t["flat_k"][slots], t["key"]) and torch.equal(t["flat_v"][slots], t["value"])
    tok = sampler.build(5, 100, BF16, CPU)()
    assert tok.shape == (5,) and tok.dtype == torch.int32 and int(tok.max()) < 100


def test_missing_or_cuda_only_backend_is_a_clear_error():
    with pytest.raises(ConfigError, match="only on CUDA"):
        require("flash_attn", "cpu")
    with pytest.raises(ConfigError, match="unknown backend"):
        require("tensorrt", "cuda")
    assert resolve("auto", attention.PREFERRED["cpu"], "cpu") == "sdpa"
    if not __import__("importlib").util.find_spec("flash_attn"):
        with pytest.raises(ConfigError, match="pip install flash-attn"):
            require("flash_attn", "cuda")


# ---------------------------------------------------------------- GPU libraries, through the fakes

def _last(calls, name):
    return [c for c in calls if c["name"] == name][-1]


@pytest.mark.parametrize("q_lens, kv_lens", [([1] * 3, [40, 40, 40]), ([1] * 3, [5, 17, 40]),
                                             ([8, 8], [8, 8]), ([8, 8], [20, 33])])
def test_vllm_attention_call_matches_vllm_flash_attn(fakes, q_lens, kv_lens):
    fn = attention.build("vllm", q_lens, kv_lens, 8, 2, 64, 16, BF16, CPU)
    fn()
    c = _last(fakes, "vllm_flash_attn.flash_attn_varlen_func")
    assert c["q_lens"] == q_lens and c["k_lens"] == kv_lens          # seqused_k = each context
    assert c["seqused_k"]["dtype"] == "int32" and c["cu_seqlens_q"]["dtype"] == "int32"
    assert c["block_table"]["dtype"] == "int32" and c["block_table"]["shape"] == (len(q_lens), -(-max(kv_lens) // 16))
    assert c["k"]["shape"][1:] == (16, 2, 64) and c["k"]["shape"][0] == sum(-(-k // 16) for k in kv_lens)
    assert c["fa_version"] == 3 and c["causal"] and c["softmax_scale"] == 64 ** -0.5
    assert c["max_seqlen_q"] == max(q_lens) and c["max_seqlen_k"] == max(kv_lens)


@pytest.mark.parametrize("block", [16, 256])
def test_flash_attn_calls_match_flash_attn_2_8(fakes, block):
    attention.build("flash_attn", [1, 1], [300, 40], 8, 2, 64, block, BF16, CPU)()
    c = _last(fakes, "flash_attn_with_kvcache")
    assert c["k_lens"] == [300, 40] and c["cache_seqlens"]["dtype"] == "int32" and c["causal"]
    assert (c["block_table"] is not None) == (block == 256)
    if block == 256:
        assert c["block_table"]["dtype"] == "int32" and c["k_cache"]["shape"][1] == 256
    attention.build("flash_attn", [16, 16], [16, 300], 8, 2, 64, block, BF16, CPU)()
    c = _last(fakes, "flash_attn_varlen_func")
    assert c["q_lens"] == [16, 16] and c["k_lens"] == [16, 300] and c["cu_seqlens_k"]["dtype"] == "int32"
    assert c["max_seqlen_k"] == 300 and (c["block_table"] is not None) == (block == 256)


def test_fake_flash_attn_rejects_what_the_real_one_rejects(fakes):
    import flash_attn
    q = torch.zeros(2, 1, 8, 64, dtype=F32)
    with pytest.raises(RuntimeError, match="fp16 and bf16"):
        flash_attn.flash_attn_with_kvcache(q, q, q, cache_seqlens=torch.ones(2, dtype=torch.int32))
    q = q.to(BF16)
    with pytest.raises(RuntimeError, match="int32"):
        flash_attn.flash_attn_with_kvcache(q, q, q, cache_seqlens=torch.ones(2, dtype=torch.int64))
    with pytest.raises(TypeError):                       # a keyword the real function does not have
        flash_attn.flash_attn_with_kvcache(q, q, q, seqused_k=torch.ones(2, dtype=torch.int32))


def test_vllm_custom_ops_are_called_as_vllm_defines_them(fakes):
    fn = norms.build("rmsnorm", 4, 64, BF16, CPU, "vllm")
    fn()
    t = _captured(fn)
    c = _last(fakes, "rms_norm")
    assert c["out"]["shape"] == c["input"]["shape"] == (4, 64) and c["epsilon"] == norms.EPS
    assert torch.allclose(t["out"].float(), F.rms_norm(t["x"].float(), (64,), eps=norms.EPS), atol=2e-2)
    fn = norms.build("fused_add_rmsnorm", 4, 64, BF16, CPU, "vllm")
    t = _captured(fn)
    x0, r0 = t["x"].clone(), t["residual"].clone()
    fn()
    assert _last(fakes, "fused_add_rms_norm")["input"]["shape"] == (4, 64)
    ref, new_res = norms.fused_add_rms_norm_native(x0, r0, torch.ones(64, dtype=BF16))
    assert torch.allclose(t["residual"].float(), new_res.float(), atol=2e-2)
    assert torch.allclose(t["x"].float(), ref.float(), atol=3e-2)
    fn = activation.build("silu_mul", 3, 32, BF16, CPU, "vllm")
    fn()
    c = _last(fakes, "silu_and_mul")
    assert c["input"]["shape"] == (3, 64) and c["out"]["shape"] == (3, 32)
    fn = rope.build(5, 4, 2, 16, 0, F32, CPU, "vllm", max_position=64)
    t = _captured(fn)
    q0, k0 = t["q"].clone(), t["k"].clone()
    fn()
    c = _last(fakes, "rotary_embedding")
    assert c["positions"]["dtype"] == "int64" and c["head_size"] == 16 and c["is_neox"] is True
    qr, kr = rope.rope_native(t["positions"], q0, k0, t["cache"], 16, 16)
    assert torch.allclose(t["q"].view(5, 4, 16), qr, atol=1e-5) and torch.allclose(t["k"].view(5, 2, 16), kr, atol=1e-5)
    fn = kv_cache.build(37, 2, 64, 16, BF16, CPU, "vllm")
    t = _captured(fn)
    fn()
    c = _last(fakes, "reshape_and_cache_flash")
    assert c["slot_mapping"]["dtype"] == "int64" and c["kv_cache_dtype"] == "auto"
    assert c["key"]["shape"] == (37, 2, 64) and c["key_cache"]["shape"][1:] == (16, 2, 64)
    assert c["k_scale"]["dtype"] == "float32"
    flat = t["key_cache"].view(-1, 2, 64)
    assert torch.equal(flat[t["slot_mapping"]], t["key"])


def test_every_profiler_point_builds_on_the_gpu_backends(fakes):
    """Each point of a small grid, with the GPU backends a vLLM box picks, builds and launches
    through the fakes (the CUDA-only kernels' plumbing, run on the CPU)."""
    from profiler import grid
    from profiler.config import compose
    from profiler.run import build_kernel, resolve
    setup = resolve(compose(["hw=cpu", "model=tiny-llama", "profile.grid=small", "profile.tp=[1,2]",
                             "profile.dtype=bfloat16"]))
    setup.backends = {"gemm": "torch", "elementwise": "vllm", "attention": "vllm"}
    setup.vllm_present = True
    setup.points = grid.build(setup.model, setup.tps, grid.axes(setup.pcfg, "cuda"),
                              ["elementwise", "attention"], 16)
    for family, pts in setup.points.items():
        for pt in pts:
            build_kernel(setup, family, pt)()
    names = {c["name"] for c in fakes}
    assert {"vllm_flash_attn.flash_attn_varlen_func", "rms_norm", "fused_add_rms_norm", "rotary_embedding",
            "silu_and_mul", "reshape_and_cache_flash"} <= names
    ragged = [c for c in fakes if c["name"].startswith("vllm_flash_attn") and len(set(c["k_lens"])) > 1]
    assert ragged, "ragged batches reach the kernel with their own context lengths"


@pytest.mark.parametrize("backend", ["sdpa", "flash_attn", "vllm"])
@pytest.mark.gpu
@needs_gpu
def test_attention_backends_run_ragged_batches_on_a_gpu(backend):
    """Real GPU: each backend runs a ragged decode and a ragged chunked prefill with the shapes
    the profiler builds (the fakes' checks, done by the real kernels)."""
    pytest.importorskip({"sdpa": "torch", "flash_attn": "flash_attn", "vllm": "vllm.vllm_flash_attn"}[backend])
    block = 256 if backend == "flash_attn" else 16
    for q_lens, kv_lens in (([1, 1], [40, 300]), ([16, 16], [16, 300])):
        out = attention.build(backend, q_lens, kv_lens, 8, 2, 64, block, BF16, torch.device("cuda"))()
        outs = out if isinstance(out, list) else [out]
        torch.cuda.synchronize()
        assert all(torch.isfinite(o).all() for o in outs)
