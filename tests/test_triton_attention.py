"""Triton attention kernels vs the reference TorchAttentionBackend (the oracle), on the same inputs and metadata.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, numpy semantics): shapes stay small. The
CUDA test compiles the real kernels and compares in bfloat16.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import sys

import pytest
import torch

from frontierlm.layers.attention import AttentionMetadata, TorchAttentionBackend, get_attn_backend

pytestmark = pytest.mark.usefixtures("one_thread")

MODULE_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "frontierlm", "layers", "triton_attention.py")

# (prefix already cached, new tokens): decodes over a prefix, fresh prefills, extends over a prefix (chunked
# prefill / prefix hit), a 1-token prefill; decode rows are interleaved with prefill rows.
_MISSING = object()

MIXED = [(37, 1), (0, 9), (20, 7), (5, 1), (0, 1), (50, 1), (12, 20), (0, 23)]


def _load_private_copy(name: str):
    """A fresh copy of the kernel module under its own name: its kernels are decorated under the current
    TRITON_INTERPRET, and the package's own module (used by get_attn_backend) is left alone."""
    spec = importlib.util.spec_from_file_location(name, MODULE_PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # triton resolves a kernel's globals through its module
    spec.loader.exec_module(mod)
    return mod


def _language_objects():
    """What Triton's interpreter patches: the language modules and the classes it adds methods to (not the
    modules of the functions it rewrites, whose globals it extends with names those rewrites need)."""
    import triton.language as tl

    objs = [tl, tl.core, tl.math]
    objs += [getattr(tl.core, n) for n in ("tensor", "dtype", "condition", "tensor_descriptor_base")
             if hasattr(tl.core, n)]
    return objs


@contextlib.contextmanager
def _interpreting():
    """TRITON_INTERPRET=1 for the duration, with triton.language put back exactly as it was afterwards.

    Triton stays imported in compiled mode, so its standard-library helpers (tl.sum, tl.max, ...) are
    compiled-mode functions the interpreter refuses to call: interpreted wrappers of the same Python functions
    stand in for them meanwhile. And the interpreter (triton 3.9) leaves its language patches in place after a
    nested jit call; restoring a snapshot keeps later compiled-mode work in this process (the sm_90 compile
    test, CUDA tests) unaffected."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    snapshot = [(obj, dict(vars(obj))) for obj in _language_objects()]
    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("TRITON_INTERPRET", "1")
        for name, fn in list(vars(tl).items()):
            if isinstance(fn, JITFunction) and not isinstance(fn, InterpretedFunction):
                setattr(tl, name, InterpretedFunction(fn.fn))
        yield
    finally:
        mp.undo()
        for obj, before in snapshot:
            now = dict(vars(obj))
            for name in now.keys() - before.keys():
                delattr(obj, name)
            for name, value in before.items():
                if now.get(name, _MISSING) is not value:
                    setattr(obj, name, value)


@pytest.fixture(scope="module")
def _interpreted_module():
    triton = pytest.importorskip("triton")
    tl = triton.language
    with _interpreting():
        mod = _load_private_copy("_frontierlm_triton_attention_interp")  # kernels decorated as interpreted

        @triton.jit
        def _add(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
            i = tl.arange(0, BLOCK)
            tl.store(y_ptr + i, tl.sum(tl.load(x_ptr + i, mask=i < n)[None, :], axis=0) + 1, mask=i < n)

        x, y = torch.arange(5, dtype=torch.float32), torch.zeros(5)
        try:
            _add[(1,)](x, y, 5, BLOCK=8)
            assert torch.equal(y, x + 1)
        except Exception as exc:  # noqa: BLE001 - any failure means no usable interpreter here
            pytest.skip(f"the Triton interpreter cannot run a trivial kernel here: {exc!r}")
    yield mod
    sys.modules.pop("_frontierlm_triton_attention_interp", None)


@pytest.fixture
def ta(_interpreted_module):
    """The kernel module, its kernels running in Triton's interpreter during the test."""
    with _interpreting():
        yield _interpreted_module


def make_case(specs, num_heads, num_kv_heads, head_dim, block_size, num_pad=2, dtype=torch.float32,
              device="cpu", seed=0):
    """Random q/k/v (views of one fused qkv tensor, as a model produces them), a cache full of random values
    (so a masked-off read would show), shuffled block ids, and metadata built like the model runner's (block
    tables are a column slice of a wider buffer)."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    need = [-(-(p + n) // block_size) for p, n in specs]
    num_blocks = sum(need) + 3
    free = list(range(num_blocks))
    rng.shuffle(free)
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    tables, slots = [], []
    for (prefix, n), nb in zip(specs, need):
        table = [free.pop() for _ in range(nb)]
        tables.append(table)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(prefix, prefix + n)]
    slots += [-1] * num_pad
    qlens = [n for _, n in specs]
    slens = [p + n for p, n in specs]
    width = max(need)
    buf = torch.zeros(len(specs) + 2, width + 3, dtype=torch.int32)
    for i, t in enumerate(tables):
        buf[i, :len(t)] = torch.tensor(t)
    num_tokens = len(slots)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen)
    qkv = qkv.to(device=device, dtype=dtype)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q, k, v = (t.view(num_tokens, -1, head_dim) for t in (q, k, v))
    starts = torch.tensor([0] + qlens).cumsum(0)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=starts.to(torch.int32).to(device), seq_lens=torch.tensor(slens, dtype=torch.int32).to(device),
        block_tables=buf.to(device)[:len(specs), :width], query_lens_cpu=qlens, seq_lens_cpu=slens,
        max_query_len=max(qlens), max_seq_len=max(slens), block_size=block_size)
    return q, k, v, cache.to(device=device, dtype=dtype), meta


def check(backend, specs, num_heads, num_kv_heads, head_dim, block_size, window, atol=1e-4, twice=False,
          **kw):
    q, k, v, cache, meta = make_case(specs, num_heads, num_kv_heads, head_dim, block_size, **kw)
    scale = head_dim ** -0.5
    ref_cache, got_cache = cache.clone(), cache.clone()
    ref_backend = TorchAttentionBackend()
    ref = ref_backend.forward(q, k, v, ref_cache, ref_backend.plan(meta), scale, window)
    plan = backend.plan(meta)
    got = backend.forward(q, k, v, got_cache, plan, scale, window)
    assert torch.equal(got_cache, ref_cache), "cache contents differ after the write"
    assert got.shape == ref.shape and got.dtype == ref.dtype
    n = sum(meta.query_lens_cpu)
    assert not got[n:].any(), "padding rows must be zero"
    torch.testing.assert_close(got.float(), ref.float(), atol=atol, rtol=0)
    if twice:  # a second layer with the same plan (shared index tensors and scratch): the same answer
        again = backend.forward(q, k, v, got_cache, plan, scale, window)
        torch.testing.assert_close(again, got, atol=0, rtol=0)


# heads, kv heads, head dim, block size, window, backend kwargs
CASES = [
    (3, 3, 16, 4, None, dict(block_n=16, block_rows=16)),               # MHA: GEMV decode path
    (8, 2, 16, 4, 6, dict(block_n=16, block_rows=16)),                  # GQA 4, window inside the contexts
    (8, 1, 64, 16, None, dict()),                                       # GQA 8 (MQA-like), default tiles
    (8, 1, 64, 16, 9, dict(block_n=16, block_rows=32, num_splits=3)),   # split-K decode + window
    (4, 1, 16, 4, 100, dict(block_n=16, block_rows=16, num_splits=2)),  # window wider than every context
    (2, 2, 48, 4, 5, dict(block_n=16, block_rows=16, num_splits=2)),    # head dim not a power of two, MHA split
    (8, 2, 128, 16, 12, dict(block_n=32, block_rows=16)),               # head dim 128
    (6, 2, 16, 16, None, dict(block_n=16, block_rows=16, num_splits=4)),   # group of 3: padded to 4 / 16
]


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,window,kw", CASES,
                         ids=[f"h{c[0]}kv{c[1]}d{c[2]}bs{c[3]}w{c[4]}" for c in CASES])
def test_mixed_batch_matches_reference(ta, heads, kv_heads, head_dim, block_size, window, kw):
    check(ta.TritonAttentionBackend(**kw), MIXED, heads, kv_heads, head_dim, block_size, window,
          twice="num_splits" in kw)


@pytest.mark.parametrize("splits", [1, 3, 8])
def test_decodes_over_long_contexts(ta, splits):
    """Only decodes, contexts spanning many blocks; splits beyond the tiles of a short context stay empty."""
    specs = [(95, 1), (3, 1), (60, 1), (0, 1), (130, 1)]
    check(ta.TritonAttentionBackend(block_n=16, num_splits=splits), specs, 8, 1, 16, 4, None, num_pad=0)
    check(ta.TritonAttentionBackend(block_n=16, num_splits=splits), specs, 8, 1, 16, 4, 20, num_pad=0)


def test_only_prefills_and_padding_only(ta):
    backend = ta.TritonAttentionBackend(block_n=16, block_rows=16)
    check(backend, [(0, 17), (0, 2)], 4, 2, 16, 4, 3, num_pad=0)   # no decodes, no padding
    check(backend, [(40, 3)], 4, 1, 16, 16, 7, num_pad=5)            # one extend, many padding rows


@pytest.mark.parametrize("seed", range(3))
def test_random_batches(ta, seed):
    rng = random.Random(seed)
    kv_heads = rng.choice([1, 2])
    heads = kv_heads * rng.choice([1, 4, 8])
    kinds = {"decode": lambda: (rng.randint(0, 60), 1), "prefill": lambda: (0, rng.randint(2, 24)),
             "extend": lambda: (rng.randint(1, 40), rng.randint(2, 16))}
    specs = [kinds[rng.choice(list(kinds))]() for _ in range(rng.randint(2, 5))]
    window = rng.choice([None, rng.randint(1, 30)])
    backend = ta.TritonAttentionBackend(block_n=16, block_rows=rng.choice([16, 32]),
                                        num_splits=rng.choice([None, 1, 2, 5]))
    check(backend, specs, heads, kv_heads, rng.choice([16, 64]), rng.choice([4, 16]), window,
          num_pad=rng.randint(0, 3), seed=seed)


def test_get_attn_backend(monkeypatch):
    monkeypatch.delenv("FRONTIERLM_ATTENTION_BACKEND", raising=False)
    assert isinstance(get_attn_backend(), TorchAttentionBackend)
    assert isinstance(get_attn_backend("cpu"), TorchAttentionBackend)
    monkeypatch.setenv("FRONTIERLM_ATTENTION_BACKEND", "torch")
    assert isinstance(get_attn_backend("cuda"), TorchAttentionBackend)
    monkeypatch.setenv("FRONTIERLM_ATTENTION_BACKEND", "flash")
    with pytest.raises(ValueError, match="FRONTIERLM_ATTENTION_BACKEND"):
        get_attn_backend()
    pytest.importorskip("triton")
    monkeypatch.setenv("FRONTIERLM_ATTENTION_BACKEND", "triton")
    assert get_attn_backend().name == "triton"
    monkeypatch.delenv("FRONTIERLM_ATTENTION_BACKEND")
    assert get_attn_backend(torch.device("cuda", 0)).name == "triton"


def _compiled_mode_module(monkeypatch, name: str):
    """A copy of the kernel module with real (compiled) kernels; skips where triton itself was imported under
    TRITON_INTERPRET=1, since its standard library then only runs in the interpreter."""
    pytest.importorskip("triton")
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(tl.sum, InterpretedFunction):
        pytest.skip("triton was imported with TRITON_INTERPRET=1: compiled kernels need a fresh process")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when it is unset
    return _load_private_copy(name)


# Arguments a real launch specializes as multiples of 16 (pointers from the caching allocator, strides and
# head_dim 64/128): the ahead-of-time compile below gets the same hints, hence the same code.
_DIVISIBLE = {"stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
              "stride_c_kv", "stride_c_slot", "stride_c_head", "HEAD_DIM"}


def _compile_sm90(fn, dtype: str, num_warps=4, **constexprs):
    """triton.compile for an H100 target with no GPU here: front end, PTX and ptxas to a cubin. It catches what
    the permissive interpreter does not (constexpr shapes, dot minimum sizes, types, early returns)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        if name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "cache_ptr"):
            sig[name] = f"*{dtype}"
        elif name.startswith("part_"):
            sig[name] = "*fp32"
        elif name == "slot_ptr":
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*i32"
        else:
            sig[name] = "fp32" if name == "qk_scale" else "i32"
        if sig[name].startswith("*") or name in _DIVISIBLE:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def test_kernels_compile_for_h100(monkeypatch):
    """The launch configurations forward() picks for bf16, head_dim 128 (64 for the windowed extend)."""
    mod = _compiled_mode_module(monkeypatch, "_frontierlm_triton_attention_compiled")
    try:
        _compile_sm90(mod._write_kv_kernel, "bf16", BLOCK_H=8, BLOCK_D=128)
    except (ImportError, FileNotFoundError) as exc:  # no NVIDIA backend or ptxas in this triton
        pytest.skip(f"cannot compile for sm_90 here: {exc!r}")
    common = dict(PAGE=16, BLOCK_D=128, DOT_PREC="tf32")
    _compile_sm90(mod._decode_kernel, "bf16", BLOCK_G=16, BLOCK_N=64, NUM_SPLITS=1, SLIDING=False, USE_DOT=True,
                  **common)
    _compile_sm90(mod._decode_kernel, "bf16", BLOCK_G=1, BLOCK_N=32, NUM_SPLITS=4, SLIDING=True, USE_DOT=False,
                  **common)
    _compile_sm90(mod._reduce_kernel, "bf16", NUM_SPLITS=4, BLOCK_S=4, BLOCK_D=128)
    _compile_sm90(mod._extend_kernel, "bf16", BLOCK_M=8, GROUP_PAD=8, BLOCK_N=64, SLIDING=False, **common)
    _compile_sm90(mod._extend_kernel, "bf16", PAGE=32, BLOCK_M=64, GROUP_PAD=1, BLOCK_D=64, BLOCK_N=64,
                  SLIDING=True, DOT_PREC="tf32")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,window", [
    (32, 32, 128, 16, None), (32, 8, 128, 16, None), (64, 8, 128, 32, 64), (16, 4, 64, 16, 24)])
def test_cuda_bfloat16_matches_reference(monkeypatch, heads, kv_heads, head_dim, block_size, window):
    mod = _compiled_mode_module(monkeypatch, "_frontierlm_triton_attention_cuda")
    specs = [(p * 7, 1) for p in range(1, 40)] + [(0, 300), (500, 129), (1000, 1), (37, 64), (0, 1)]
    for kw in (dict(), dict(num_splits=4)):
        check(mod.TritonAttentionBackend(**kw), specs, heads, kv_heads, head_dim, block_size, window,
              atol=2e-2, dtype=torch.bfloat16, device="cuda")
