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


@pytest.mark.parametrize("bias", [False, True])
def test_one_static_row_is_a_reduction_with_the_same_values(bias):
    torch.manual_seed(0)
    layer = lin.Linear(64, 48, bias=bias)
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
