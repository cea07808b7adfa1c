"""MoE layer: grouped experts vs a per-token reference, routers and whole blocks vs transformers 5."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from frontierlm.layers.mlp import GatedMLP
from frontierlm.layers.moe import FusedExperts, MoE, RoutingConfig, load_balancing_loss, select_experts

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module", autouse=True)
def _frozen_heap():
    """Import transformers' MoE models once and freeze the heap: otherwise Python's full garbage collections
    walk transformers' huge import graph again and again, and each tiny parity test takes seconds."""
    import gc

    for arch in ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"):
        importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def _init(module: torch.nn.Module, std: float = 0.2) -> None:
    """Our parameters (and transformers' experts) start as torch.empty: give them values."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)


def _random_ids(T: int, E: int, k: int, experts=None) -> torch.Tensor:
    """k distinct experts per token, drawn from `experts` (default: all)."""
    scores = torch.rand(T, E)
    if experts is not None:
        unused = [e for e in range(E) if e not in experts]
        scores[:, unused] = -1.0
    return scores.topk(k, dim=-1).indices


_ACTS = {"silu": F.silu, "gelu_pytorch_tanh": lambda v: F.gelu(v, approximate="tanh")}


def _naive_experts(x, weights, ids, w13, w2, act="silu"):
    act, out = _ACTS[act], torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate, up = (w13[e] @ x[t]).chunk(2)
            out[t] += weights[t, j] * (w2[e] @ (act(gate) * up))
    return out


# ---------------------------------------------------------------- grouped experts


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("T,k,experts,act", [(7, 2, None, "silu"), (9, 2, [0, 3, 5], "silu"), (1, 2, None, "silu"),
                                             (1, 1, [4], "silu"), (0, 2, None, "silu"),
                                             (5, 3, None, "gelu_pytorch_tanh")])
def test_fused_experts_match_per_token_reference(grouped, T, k, experts, act):
    if grouped and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not available")
    torch.manual_seed(0)
    E, H, I = 6, 16, 8
    layer = FusedExperts(E, H, I, act=act, use_grouped_mm=grouped)
    _init(layer)
    x = torch.randn(T, H)
    ids = _random_ids(T, E, k, experts)
    weights = torch.rand(T, k)
    out, counts = layer(x, weights, ids)
    ref = _naive_experts(x, weights, ids, layer.w13.detach(), layer.w2.detach(), act)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert counts.dtype == torch.int64
    assert torch.equal(counts, torch.bincount(ids.reshape(-1), minlength=E))
    assert int(counts.sum()) == T * k
    if experts is not None:
        assert all(int(counts[e]) == 0 for e in range(E) if e not in experts)


def test_expert_weight_loaders():
    E, H, I = 3, 8, 4
    layer = FusedExperts(E, H, I)
    w13, w2 = layer.w13, layer.w2
    assert w13.shard_ids == tuple((e, p) for e in range(E) for p in (0, 1))
    assert w2.shard_ids == tuple((e, None) for e in range(E))
    gate, up, down = torch.randn(I, H), torch.randn(I, H), torch.randn(H, I)
    w13.weight_loader(w13, gate, (1, 0))
    w13.weight_loader(w13, up, (1, 1))
    w2.weight_loader(w2, down, (2, None))
    assert torch.equal(w13[1, :I], gate) and torch.equal(w13[1, I:], up) and torch.equal(w2[2], down)
    fused = torch.randn(E, 2 * I, H)
    w13.weight_loader(w13, fused, None)  # transformers 5's in-memory experts.gate_up_proj
    assert torch.equal(w13.data, fused)
    for param, wrong, shard in [(w13, torch.randn(I + 1, H), (0, 0)), (w2, torch.randn(I, H), (0, None)),
                                (w2, torch.randn(E, I, H), None)]:
        with pytest.raises(ValueError, match="shape mismatch"):
            param.weight_loader(param, wrong, shard)
    for bad in [(E, 0), (-1, 0), (0, 2), "gate", 0]:
        with pytest.raises(ValueError, match="shard id"):
            w13.weight_loader(w13, gate, bad)
    with pytest.raises(ValueError, match="shard id"):
        w2.weight_loader(w2, down, (0, 0))


def test_gated_mlp():
    torch.manual_seed(0)
    mlp = GatedMLP(8, 6)
    g, u, d = torch.randn(6, 8), torch.randn(6, 8), torch.randn(8, 6)
    w = mlp.gate_up_proj.weight
    w.weight_loader(w, g, 0)
    w.weight_loader(w, u, 1)
    mlp.down_proj.weight.weight_loader(mlp.down_proj.weight, d)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(mlp(x), (F.silu(x @ g.T) * (x @ u.T)) @ d.T)


# ---------------------------------------------------------------- routing config and hand-computed routing


@pytest.mark.parametrize("kwargs,field", [
    (dict(num_experts=0, top_k=1), "num_experts"),
    (dict(num_experts=4, top_k=5), "top_k"),
    (dict(num_experts=4, top_k=0), "top_k"),
    (dict(num_experts=4, top_k=2, scoring="relu"), "scoring"),
    (dict(num_experts=8, top_k=2, num_groups=4, topk_groups=1, group_score="mean"), "group_score"),
    (dict(num_experts=4, top_k=2, routed_scaling_factor=0.0), "routed_scaling_factor"),
    (dict(num_experts=8, top_k=2, num_groups=4), "topk_groups"),
    (dict(num_experts=6, top_k=2, num_groups=4, topk_groups=1), "num_groups"),
    (dict(num_experts=8, top_k=2, num_groups=4, topk_groups=5), "topk_groups"),
    (dict(num_experts=8, top_k=5, num_groups=4, topk_groups=2), "topk_groups"),
    (dict(num_experts=4, top_k=1, num_groups=4, topk_groups=2, group_score="top2_sum"), "top2_sum"),
])
def test_routing_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RoutingConfig(**kwargs)


def test_moe_constructor_validation():
    r = RoutingConfig(4, 2)
    with pytest.raises(ValueError, match="shared_gate"):
        MoE(8, 4, r, shared_gate=True)
    with pytest.raises(ValueError, match="shared_name"):
        MoE(8, 4, r, shared_intermediate_size=4, shared_name="gate")


def _ids(ids: torch.Tensor) -> list[list[int]]:
    return ids.sort(dim=-1).values.tolist()


def _by_expert(weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Each row's weights in ascending expert-id order."""
    return weights.gather(1, ids.argsort(dim=-1))


# Groups of two: g0 = {0, 1}, g1 = {2, 3}, g2 = {4, 5}, g3 = {6, 7}.
_GROUP_LOGITS = torch.tensor([[5.0, -1.0, 4.0, 3.0, 3.5, 3.4, 0.0, 0.0]])


def test_group_limited_routing_by_hand():
    logits = _GROUP_LOGITS
    # No groups: the three best experts overall.
    _, ids = select_experts(logits, RoutingConfig(8, 3))
    assert _ids(ids) == [[0, 2, 4]]
    # DeepSeek-V2 "max": g0 (5) and g1 (4) survive, so expert 4 (3.5) loses to expert 3 (3.0).
    weights, ids = select_experts(logits, RoutingConfig(8, 3, num_groups=4, topk_groups=2, group_score="max"))
    assert _ids(ids) == [[0, 2, 3]]
    assert torch.equal(_by_expert(weights, ids), logits.softmax(-1)[:, [0, 2, 3]])
    # DeepSeek-V3 "top2_sum" with sigmoid: g2 (0.971 + 0.968) and g1 (0.982 + 0.953) beat g0 (0.993 + 0.269):
    # the single best expert (0) is not eligible.
    cfg = RoutingConfig(8, 3, scoring="sigmoid", num_groups=4, topk_groups=2, group_score="top2_sum")
    weights, ids = select_experts(logits, cfg)
    assert _ids(ids) == [[2, 4, 5]]
    assert torch.equal(_by_expert(weights, ids), logits.sigmoid()[:, [2, 4, 5]])
    # With "max" the same sigmoid scores keep g0 and g1.
    _, ids = select_experts(logits, RoutingConfig(8, 3, scoring="sigmoid", num_groups=4, topk_groups=2))
    assert _ids(ids) == [[0, 2, 3]]


def test_correction_bias_changes_selection_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    cfg = RoutingConfig(4, 2, scoring="sigmoid")
    _, ids = select_experts(logits, cfg)
    assert _ids(ids) == [[0, 1]]
    bias = torch.tensor([0.0, 0.0, 0.0, 2.0])  # sigmoid(-1) + 2 = 2.27 now beats everything
    weights, ids = select_experts(logits, cfg, bias)
    assert _ids(ids) == [[0, 3]]
    expected = torch.sigmoid(torch.tensor([[2.0, -1.0]]))  # the unbiased scores
    assert torch.equal(_by_expert(weights, ids), expected)
    # Normalised and scaled (DeepSeek-V3), still from the unbiased scores.
    cfg = RoutingConfig(4, 2, scoring="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5)
    weights, ids = select_experts(logits, cfg, bias)
    torch.testing.assert_close(_by_expert(weights, ids), expected / expected.sum() * 2.5)
    # The bias also picks groups: g3 ({6, 7}, 0.5 + 1 each) wins, then g2.
    bias = torch.tensor([0.0] * 6 + [1.0, 1.0])
    cfg = RoutingConfig(8, 3, scoring="sigmoid", num_groups=4, topk_groups=2, group_score="top2_sum")
    weights, ids = select_experts(_GROUP_LOGITS, cfg, bias)
    assert _ids(ids) == [[4, 6, 7]]
    assert torch.equal(_by_expert(weights, ids), _GROUP_LOGITS.sigmoid()[:, [4, 6, 7]])


# ---------------------------------------------------------------- parity with transformers


E, H, I, K = 16, 32, 16, 4


def _hf(arch: str):
    """(config, router class, sparse block class, our RoutingConfig, MoE kwargs) for a tiny model."""
    import transformers as tf
    name = arch.removesuffix("_grouped")
    m = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    common = dict(hidden_size=H, num_attention_heads=4, num_key_value_heads=4, num_experts_per_tok=K)
    if arch == "mixtral":
        c = tf.MixtralConfig(intermediate_size=I, num_local_experts=E, **common)
        return c, m.MixtralTopKRouter, m.MixtralSparseMoeBlock, RoutingConfig(E, K, norm_topk_prob=True), {}
    if arch == "qwen2_moe":
        c = tf.Qwen2MoeConfig(moe_intermediate_size=I, num_experts=E, shared_expert_intermediate_size=24, **common)
        return (c, m.Qwen2MoeTopKRouter, m.Qwen2MoeSparseMoeBlock, RoutingConfig(E, K, norm_topk_prob=False),
                dict(shared_intermediate_size=24, shared_name="shared_expert", shared_gate=True))
    if arch == "qwen3_moe":
        c = tf.Qwen3MoeConfig(moe_intermediate_size=I, num_experts=E, norm_topk_prob=True, **common)
        return c, m.Qwen3MoeTopKRouter, m.Qwen3MoeSparseMoeBlock, RoutingConfig(E, K, norm_topk_prob=True), {}
    if arch.startswith("deepseek_v2"):
        groups = (4, 2) if arch.endswith("grouped") else (None, None)
        c = tf.DeepseekV2Config(moe_intermediate_size=I, n_routed_experts=E, n_shared_experts=2,
                                topk_method="group_limited_greedy" if groups[0] else "greedy",
                                n_group=groups[0], topk_group=groups[1], routed_scaling_factor=1.5, **common)
        routing = RoutingConfig(E, K, routed_scaling_factor=1.5, num_groups=groups[0], topk_groups=groups[1])
        return c, m.DeepseekV2TopkRouter, m.DeepseekV2Moe, routing, dict(shared_intermediate_size=2 * I,
                                                                          router_fp32=True)
    c = tf.DeepseekV3Config(moe_intermediate_size=I, n_routed_experts=E, n_shared_experts=1, n_group=4,
                            topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, **common)
    routing = RoutingConfig(E, K, scoring="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
                            num_groups=4, topk_groups=2, group_score="top2_sum")
    return c, m.DeepseekV3TopkRouter, m.DeepseekV3MoE, routing, dict(shared_intermediate_size=I,
                                                                       correction_bias=True, router_fp32=True)


ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v2_grouped", "deepseek_v3"]
# Where we call topk exactly as transformers does, the order of the ids matches too.
SAME_ORDER = {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"}


@pytest.mark.parametrize("arch", ARCHS)
def test_select_experts_matches_transformers_router(arch):
    torch.manual_seed(0)
    config, router_cls, _, routing, kw = _hf(arch)
    router = router_cls(config)
    with torch.no_grad():
        router.weight.normal_(0.0, 1.0)  # spread logits: many different routing decisions
        bias = None
        if hasattr(router, "e_score_correction_bias"):
            router.e_score_correction_bias.copy_(torch.randn(E) * 0.1)
            bias = router.e_score_correction_bias
        x = torch.randn(64, H)
        ref_logits, ref_w, ref_ids = router(x)
        logits = F.linear(x.float(), router.weight.float()) if kw.get("router_fp32") else F.linear(x, router.weight)
        weights, ids = select_experts(logits, routing, bias)
    assert torch.equal(logits, ref_logits)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == (64, K)
    assert torch.equal(ids.sort(-1).values, ref_ids.sort(-1).values)
    # Weights matched by expert, bit for bit.
    assert torch.equal(_by_expert(weights, ids), _by_expert(ref_w, ref_ids))
    if arch in SAME_ORDER:
        assert torch.equal(ids, ref_ids) and torch.equal(weights, ref_w)
    if bias is not None:  # the bias did change some selections in this draw
        assert not torch.equal(ids.sort(-1).values, select_experts(logits, routing)[1].sort(-1).values)


def _copy_from_hf(ours: MoE, theirs, per_expert: bool) -> None:
    """Load transformers' weights through our weight_loaders (per-expert shards or the fused tensors)."""
    def load(param, tensor, shard=None):
        param.weight_loader(param, tensor.detach(), shard)

    load(ours.gate.weight, theirs.gate.weight)
    if hasattr(theirs.gate, "e_score_correction_bias"):
        load(ours.gate.e_score_correction_bias, theirs.gate.e_score_correction_bias)
    gate_up, down = theirs.experts.gate_up_proj, theirs.experts.down_proj  # [E, 2I, H], [E, H, I]
    w13, w2 = ours.experts.w13, ours.experts.w2
    if per_expert:  # what a checkpoint on disk holds: experts.<e>.{gate,up,down}_proj.weight
        for e in range(gate_up.shape[0]):
            gate, up = gate_up[e].chunk(2)
            load(w13, gate, (e, 0))
            load(w13, up, (e, 1))
            load(w2, down[e], (e, None))
    else:
        load(w13, gate_up)
        load(w2, down)
    if ours.shared_name:
        src, dst = getattr(theirs, ours.shared_name), getattr(ours, ours.shared_name)
        load(dst.gate_up_proj.weight, src.gate_proj.weight, 0)
        load(dst.gate_up_proj.weight, src.up_proj.weight, 1)
        load(dst.down_proj.weight, src.down_proj.weight)
    if ours.shared_expert_gate is not None:
        load(ours.shared_expert_gate.weight, theirs.shared_expert_gate.weight)


@pytest.mark.parametrize("arch", ARCHS)
def test_moe_layer_matches_transformers_block(arch):
    torch.manual_seed(0)
    config, _, block_cls, routing, kw = _hf(arch)
    config._experts_implementation = "eager"
    theirs = block_cls(config).eval()
    _init(theirs)
    with torch.no_grad():
        theirs.gate.weight.normal_(0.0, 1.0)
        if hasattr(theirs.gate, "e_score_correction_bias"):
            theirs.gate.e_score_correction_bias.copy_(torch.randn(E) * 0.1)
    ours = MoE(H, I, routing, act=config.hidden_act, **kw).eval()
    _copy_from_hf(ours, theirs, per_expert=arch != "mixtral")
    x = torch.randn(2, 5, H)
    with torch.no_grad():
        ref = theirs(x)
        out = ours(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- statistics


def test_expert_counts_accumulate_and_reset():
    torch.manual_seed(0)
    routing = RoutingConfig(8, 2, norm_topk_prob=True)
    moe = MoE(16, 8, routing).eval()
    _init(moe)
    assert "expert_counts" not in moe.state_dict()  # statistics, not weights
    x1, x2 = torch.randn(5, 16), torch.randn(3, 4, 16)
    with torch.no_grad():
        moe(x1)
        moe(x2)
        ids = [select_experts(F.linear(x.reshape(-1, 16), moe.gate.weight), routing)[1] for x in (x1, x2)]
    assert int(moe.expert_counts.sum()) == (5 + 12) * 2
    assert torch.equal(moe.expert_counts, torch.bincount(torch.cat(ids).reshape(-1), minlength=8))
    assert moe.last_router_logits is None  # eval mode keeps nothing
    moe.reset_expert_counts()
    assert int(moe.expert_counts.abs().sum()) == 0
    moe.train()
    moe(x1)
    assert moe.last_router_logits.shape == (5, 8)


# ---------------------------------------------------------------- training-time balancing

def test_load_balancing_loss_by_hand():
    """N * sum_i f_i P_i on fixed router outputs: 4 tokens, 4 experts, top-1."""
    logits = torch.log(torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.6, 0.2, 0.1, 0.1],
                                     [0.1, 0.1, 0.7, 0.1], [0.4, 0.3, 0.2, 0.1]]))
    routing = RoutingConfig(4, 1)
    ids = select_experts(logits, routing)[1]
    assert ids.flatten().tolist() == [0, 0, 2, 0]
    f = [3 / 4, 0, 1 / 4, 0]                       # share of routed slots per expert
    p = [(0.7 + 0.6 + 0.1 + 0.4) / 4, (0.1 + 0.2 + 0.1 + 0.3) / 4, (0.1 + 0.1 + 0.7 + 0.2) / 4, 0.4 / 4]
    expected = 4 * sum(fi * pi for fi, pi in zip(f, p))
    assert load_balancing_loss(logits, ids, routing).item() == pytest.approx(expected, rel=1e-6)
    uniform = torch.zeros(8, 4)
    even = torch.arange(8).remainder(4)[:, None]
    assert load_balancing_loss(uniform, even, routing).item() == pytest.approx(1.0)
    # sigmoid scores are normalized per token before averaging
    sig = RoutingConfig(4, 1, scoring="sigmoid")
    s = logits.sigmoid()
    p = (s / s.sum(-1, keepdim=True)).mean(0).tolist()
    assert load_balancing_loss(logits, ids, sig).item() == pytest.approx(4 * sum(a * b for a, b in zip(f, p)),
                                                                        rel=1e-6)


def test_aux_loss_is_set_in_training_and_has_router_gradient():
    torch.manual_seed(0)
    moe = MoE(16, 8, RoutingConfig(8, 2))
    _init(moe)
    moe.aux_loss_coef = 0.01
    x = torch.randn(12, 16)
    moe.eval()
    moe(x)
    assert moe.aux_loss is None  # inference never pays for it
    moe.train()
    moe(x)
    ids = select_experts(F.linear(x, moe.gate.weight), moe.routing)[1]
    expected = 0.01 * load_balancing_loss(F.linear(x, moe.gate.weight), ids, moe.routing)
    torch.testing.assert_close(moe.aux_loss, expected)
    moe.aux_loss.backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0


def test_aux_free_bias_moves_toward_balance():
    """Router skewed toward expert 0: repeated bias updates (DeepSeek-V3, gamma per step) shrink the
    imbalance without touching the router weights or the gating weights' formula."""
    torch.manual_seed(0)
    routing = RoutingConfig(8, 2, scoring="sigmoid", num_groups=None)
    moe = MoE(16, 8, routing, correction_bias=True).train()
    _init(moe)
    with torch.no_grad():
        moe.gate.weight[0] += 0.5  # expert 0 wins most tokens
    x = torch.randn(256, 16)

    def imbalance():
        moe(x)
        load = moe.last_counts.float()
        return (load.max() / load.mean()).item()

    before, w = imbalance(), moe.gate.weight.detach().clone()
    for _ in range(60):
        moe(x)
        moe.update_correction_bias(0.01)
    after = imbalance()
    assert after < before and after < 1.5
    bias = moe.gate.e_score_correction_bias
    assert bias[0] < 0 and bias.argmin() == 0  # the overloaded expert was pushed down most
    assert torch.equal(moe.gate.weight.detach(), w)
    with pytest.raises(ValueError, match="correction bias"):
        MoE(16, 8, RoutingConfig(8, 2)).update_correction_bias(0.01)


# ---------------------------------------------------------------- CUDA


def _build_bf16(*args, device="cpu", **kwargs) -> MoE:
    """As the model loader builds it: default dtype bfloat16, allocated on the device."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return MoE(*args, **kwargs)
    finally:
        torch.set_default_dtype(old)


def test_dtypes_under_bf16_default():
    moe = _build_bf16(16, 8, RoutingConfig(4, 2), shared_intermediate_size=8, correction_bias=True)
    assert moe.experts.w13.dtype == moe.gate.weight.dtype == moe.shared_experts.down_proj.weight.dtype == torch.bfloat16
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
    assert moe.expert_counts.dtype == torch.int64


def _bf16_moe():
    torch.manual_seed(0)
    routing = RoutingConfig(16, 4, scoring="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
                            num_groups=4, topk_groups=2, group_score="top2_sum")
    moe = _build_bf16(64, 32, routing, shared_intermediate_size=32, correction_bias=True, router_fp32=True,
                      device="cuda")
    _init(moe, std=0.1)
    return moe, torch.randn(3, 40, 64, device="cuda", dtype=torch.bfloat16)


@cuda
def test_grouped_mm_matches_loop_bf16_without_host_sync():
    moe, x = _bf16_moe()
    if not moe.experts._use_grouped_mm(x):
        pytest.skip("torch._grouped_mm needs sm90+")
    with torch.no_grad():
        moe(x)  # warm up: lazy initialisation may synchronise
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host sync in the grouped path raises
        try:
            out = moe(x)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        moe.experts.use_grouped_mm = False
        ref = moe(x)
    assert int(moe.expert_counts.sum()) == 3 * 3 * 40 * 4
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
