"""The compiled one-row product (layers/linear.py `linear`): a multiply-and-sum for one static float32 row inside
a compiled CPU graph, F.linear everywhere else; the same values either way."""
import pytest
import torch

import frontierlm.layers.linear as lin


def _captured_ops(fn, *args):
    """Compile `fn` with a backend that records the ops dynamo traced, and return (output, op names)."""
    names = []

    def backend(gm, example_inputs):
        names.extend(str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method"))
        return gm

    torch._dynamo.reset()
    out = torch.compile(fn, backend=backend, dynamic=False)(*args)
    return out, names


@pytest.mark.parametrize("bias,rows", [(False, 48), (True, 48), (False, 50), (False, 3)])
def test_one_static_row_is_a_reduction_with_the_same_values(bias, rows):
    torch.manual_seed(0)  # 50 rows do not divide into ONE_ROW_SPLIT equal slices, 3 are fewer than the slices
    layer = lin.Linear(64, rows, bias=bias)
    torch.nn.init.normal_(layer.weight)
    if bias:
        torch.nn.init.normal_(layer.bias)
    x = torch.randn(1, 64)
    out, ops = _captured_ops(layer, x)
    assert not any("linear" in o for o in ops), ops
    assert any("sum" in o for o in ops), ops
    torch.testing.assert_close(out, torch.nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_several_rows_bf16_and_eager_keep_f_linear():
    layer = lin.Linear(32, 16)
    torch.nn.init.normal_(layer.weight)
    _, ops = _captured_ops(layer, torch.randn(3, 32))
    assert any("linear" in o for o in ops), ops
    layer_bf16 = lin.Linear(32, 16).to(torch.bfloat16)
    _, ops = _captured_ops(layer_bf16, torch.randn(1, 32, dtype=torch.bfloat16))
    assert any("linear" in o for o in ops), ops  # bfloat16 keeps oneDNN's kernel (measured faster)
    x = torch.randn(1, 32)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight))  # eager: F.linear itself


def test_switch_off_keeps_f_linear(monkeypatch):
    monkeypatch.setattr(lin, "ONE_ROW_REDUCTION", False)
    layer = lin.Linear(32, 16)
    torch.nn.init.normal_(layer.weight)
    _, ops = _captured_ops(layer, torch.randn(1, 32))
    assert any("linear" in o for o in ops), ops


def test_the_norm_output_is_stored_once_not_recomputed_per_weight_row():
    """With the decode compile's store-vs-recompute setting, the one-row product after an RMSNorm reads a stored
    normalised row: the loop that walks the weight rows (several accumulators, one per slice) has no sqrt."""
    import re

    from torch._inductor.utils import run_and_get_code

    from frontierlm.engine.fast_decode import CPU_INDUCTOR_OPTIONS
    from frontierlm.layers.norm import RMSNorm

    torch.manual_seed(0)
    norm, layer = RMSNorm(64), lin.Linear(64, 48)
    torch.nn.init.normal_(layer.weight)

    def f(x, r):
        h, res = norm(x, r)
        return layer(h), res

    x, r = torch.randn(1, 64), torch.randn(1, 64)
    torch._dynamo.reset()
    setting = {"realize_reads_threshold": CPU_INDUCTOR_OPTIONS["realize_reads_threshold"]}
    with torch._inductor.config.patch(setting), torch.no_grad():
        (out, res), code = run_and_get_code(torch.compile(f, dynamic=False), x, r)
    ref_h, ref_res = norm(x, r)
    torch.testing.assert_close(out, torch.nn.functional.linear(ref_h, layer.weight), rtol=1e-5, atol=1e-5)
    loops = re.split(r"for\(int64_t x0", "\n".join(code))
    product = [lp for lp in loops if "tmp_acc1_vec" in lp]
    assert product, "the sliced product did not become one loop with several accumulators"
    assert all("std::sqrt" not in lp.split("vec_reduce_all")[0] for lp in product)
