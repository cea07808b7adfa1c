"""Quantized linear layers load checkpoint tensors exactly as their reference dequantization says.

Oracles: compressed-tensors' own compressors (they write the pack-quantized / float-quantized tensors and their
`decompress` is the reference), and a block-by-block loop written here for DeepSeek-V3's 128x128 scales. Odd
shapes (rows not a multiple of 16, columns that do not divide the block) and packed q|k|v layers whose parts
have different scales are covered; the kernels' outputs are checked against x @ W_dequantized^T.
"""
import pytest
import torch

from frontierlm.layers.linear import Linear, QKVLinear
from frontierlm.quant import formats
from frontierlm.quant.config import WeightScheme, from_hf_config, online_scheme
from frontierlm.quant.linear_methods import Fp8Kernel, QuantLinearMethod

pytestmark = pytest.mark.usefixtures("one_thread")


def _ct(bits, strategy, group_size=None, symmetric=True, kind="int"):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=bits, type=kind, strategy=strategy, group_size=group_size, symmetric=symmetric))


def _ct_compress(w, scheme, fmt):
    """compressed-tensors' own qparams and compressor: the checkpoint tensors llm-compressor would write."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    args = scheme.weights
    if args.strategy == "group":
        view = w.view(w.shape[0], -1, args.group_size)
        lo, hi = view.amin(-1), view.amax(-1)
    elif args.strategy == "channel":
        lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    else:
        lo, hi = w.amin().reshape(1), w.amax().reshape(1)
    scale, zp = calculate_qparams(lo, hi, args)
    comp = BaseCompressor.load_from_registry(fmt)
    state = comp.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp}, scheme)
    reference = comp.decompress(dict(state), scheme)["weight"]
    return state, reference


def _load(layer, scheme, fmt, tensors_by_shard):
    method = QuantLinearMethod(scheme, fmt)
    method.create_weights(layer)
    for shard, tensors in tensors_by_shard.items():
        for name, t in tensors.items():
            param = getattr(layer, name)
            param.weight_loader(param, t, shard)
    method.process_weights_after_loading(layer)
    return method


@pytest.mark.parametrize("bits,strategy,group,symmetric", [
    (4, "group", 32, True), (4, "group", 64, True), (4, "group", 128, True), (4, "group", 32, False),
    (8, "channel", None, True), (8, "group", 64, True), (4, "channel", None, True), (4, "group", 16, True)])
def test_pack_quantized_matches_compressed_tensors(bits, strategy, group, symmetric):
    torch.manual_seed(0)
    n, k = 40, 256  # 40 rows: not a multiple of the int4 kernel's 16-row tiles
    w = torch.randn(n, k)
    scheme = _ct(bits, strategy, group, symmetric)
    state, reference = _ct_compress(w, scheme, "pack-quantized")
    ours = WeightScheme("int", bits, strategy, group, None, symmetric)
    method = _load(Linear(k, n), ours, "pack-quantized", {None: state})
    got = method.dequantized_weight()
    # the int4 kernel's scales are bfloat16, the int8 path's too: relative 2^-8 of each weight
    torch.testing.assert_close(got, reference, rtol=8e-3, atol=1e-3 * reference.abs().max().item())
    x = torch.randn(3, k)
    y = method.apply(None, x, None)
    ref_y = x @ reference.t()
    assert (y - ref_y).abs().max() <= 0.02 * ref_y.abs().max()


def test_float_quantized_per_tensor_and_channel_match_compressed_tensors():
    torch.manual_seed(1)
    w = torch.randn(48, 96)
    for strategy in ("tensor", "channel"):
        scheme = _ct(8, strategy, kind="float")
        state, reference = _ct_compress(w, scheme, "float-quantized")
        assert state["weight"].dtype == torch.float8_e4m3fn
        method = _load(Linear(96, 48), WeightScheme("float", 8, strategy), "float-quantized", {None: state})
        torch.testing.assert_close(method.dequantized_weight(), reference.float(), rtol=0, atol=0)


def _block_reference(values, scale_inv, block=128):
    """DeepSeek-V3's rule, one block at a time: w[i, j] = fp8[i, j] * scale_inv[i // 128, j // 128]."""
    out = torch.empty(values.shape)
    for bi in range(scale_inv.shape[0]):
        for bj in range(scale_inv.shape[1]):
            rows, cols = slice(bi * block, (bi + 1) * block), slice(bj * block, (bj + 1) * block)
            out[rows, cols] = values[rows, cols].float() * scale_inv[bi, bj]
    return out


@pytest.mark.parametrize("n,k", [(256, 384), (200, 300), (72, 130)])  # the last two do not divide 128
def test_deepseek_block_scales_round_trip(n, k):
    torch.manual_seed(2)
    w = torch.randn(n, k) * torch.logspace(-2, 1, n)[:, None]  # rows of very different magnitude
    values, scale_inv = formats.quantize_fp8(w, "block", (128, 128))
    assert scale_inv.shape == (-(-n // 128), -(-k // 128))
    reference = _block_reference(values, scale_inv)
    assert (reference - w).abs().max() <= 0.07 * w.abs().max()  # E4M3: 3 mantissa bits
    scheme = WeightScheme("float", 8, "block", block=(128, 128), activations="dynamic")
    method = _load(Linear(k, n), scheme, "deepseek-fp8", {None: {"weight": values, "weight_scale_inv": scale_inv}})
    torch.testing.assert_close(method.dequantized_weight(), reference, rtol=0, atol=0)
    x = torch.randn(5, k)
    torch.testing.assert_close(method.apply(None, x, None), x @ reference.t(), rtol=1e-4, atol=1e-4)


def test_packed_qkv_keeps_each_parts_scales():
    """q, k and v arrive as separate checkpoint tensors with their own per-tensor scale and block grids."""
    torch.manual_seed(3)
    layer = QKVLinear(96, 16, num_heads=6, num_kv_heads=2)  # q 96 rows, k and v 32 rows each
    parts = {"q": torch.randn(96, 96), "k": 10 * torch.randn(32, 96), "v": 0.1 * torch.randn(32, 96)}
    tensors, refs = {}, []
    for sid, w in parts.items():
        values, scale_inv = formats.quantize_fp8(w, "block", (128, 128))
        tensors[sid] = {"weight": values, "weight_scale_inv": scale_inv}
        refs.append(_block_reference(values, scale_inv))
    scheme = WeightScheme("float", 8, "block", block=(128, 128))
    method = _load(layer, scheme, "deepseek-fp8", tensors)
    torch.testing.assert_close(method.dequantized_weight(), torch.cat(refs), rtol=0, atol=0)
    q, k, v = layer(torch.randn(2, 96))
    assert q.shape == (2, 96) and k.shape == v.shape == (2, 32)

    tensors = {sid: dict(zip(("weight", "weight_scale"), formats.quantize_fp8(w, "tensor"))) for sid, w in parts.items()}
    method = _load(QKVLinear(96, 16, 6, 2), WeightScheme("float", 8, "tensor"), "float-quantized", tensors)
    ref = torch.cat([t["weight"].float() * t["weight_scale"] for t in tensors.values()])
    torch.testing.assert_close(method.dequantized_weight(), ref, rtol=0, atol=0)


# relative RMS error of the output on Gaussian weights: half a quantization step, averaged over 200 inputs
# (int8: absmax / 127.5 per row; int4: absmax of 32 / 7.5 per group; E4M3: 3 mantissa bits)
@pytest.mark.parametrize("name,bound", [("int8", 0.01), ("int4", 0.12), ("fp8", 0.04), ("fp8-block", 0.04)])
def test_online_quantization_of_odd_shapes(name, bound):
    """quantization=... on a float layer whose shape fits no tile (50 x 200, last group partial)."""
    torch.manual_seed(4)
    layer = Linear(200, 50)
    w = torch.randn(50, 200)
    layer.weight.data.copy_(w)
    method = QuantLinearMethod(online_scheme(name), None)
    method.create_weights(layer)
    method.process_weights_after_loading(layer)
    assert not hasattr(layer, "weight")
    x = torch.randn(4, 200)
    y, ref = layer(x), x @ w.t()
    assert (y - ref).norm() <= bound * ref.norm(), (y - ref).norm() / ref.norm()
    deq = method.dequantized_weight()
    torch.testing.assert_close(method.apply(layer, x, None), x @ deq.t(), rtol=0.02, atol=0.02 * ref.abs().max().item())


def test_fp8_w8a8_scaled_mm_path_matches_the_weight_only_oracle():
    """The CUDA path (torch._scaled_mm with per-token FP8 activations) runs on CPU too: compare it here."""
    torch.manual_seed(5)
    w = torch.randn(64, 128)
    values, scale = formats.quantize_fp8(w, "channel")
    kernel = Fp8Kernel(values, scale, None, 128)
    x = torch.randn(7, 128) * torch.logspace(-1, 1, 7)[:, None]  # rows of different scale: per-token scales
    oracle = kernel.forward_weight_only(x)
    w8a8 = kernel.forward_w8a8(x)
    assert (w8a8 - oracle).abs().amax(1).div(oracle.abs().amax(1)).max() < 0.06
    static = Fp8Kernel(values, scale, x.abs().max() / 448, 128).forward_w8a8(x)
    assert (static - oracle).abs().max() < 0.06 * oracle.abs().max()


@pytest.mark.parametrize("qc,match", [
    ({"quant_method": "gptq", "bits": 4}, "quantization method 'gptq' is not supported"),
    ({"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "config_groups": {}},
     "format 'nvfp4-pack-quantized' is not supported"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128,
                                           "actorder": "group"}}}}, "actorder='group'"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 2, "type": "int", "strategy": "channel"}}}}, "int2 weights"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "float", "strategy": "group"}}}}, "float4"),
    ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}, "'e5m2' is not supported"),
])
def test_unsupported_schemes_are_named(qc, match):
    with pytest.raises(ValueError, match=match):
        from_hf_config(qc)


def test_supported_configs_parse():
    qc = from_hf_config({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                         "weight_block_size": [128, 128]})
    assert qc.scheme_for("model.layers.0.self_attn.q_proj") == WeightScheme(
        "float", 8, "block", block=(128, 128), activations="dynamic")
    ct = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head", "re:.*mlp.gate$"],
          "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float",
                                                                     "strategy": "tensor"},
                                  "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor",
                                                        "dynamic": False}}}}
    qc = from_hf_config(ct)
    assert qc.scheme_for("model.layers.3.mlp.down_proj").activations == "static"
    assert qc.scheme_for("lm_head") is None and qc.scheme_for("model.layers.1.mlp.gate") is None


@pytest.mark.parametrize("n,k,group,symmetric", [(200, 200, 32, True), (64, 256, 128, False), (48, 96, 32, True)])
def test_int4_dense_prefill_path_matches_the_packed_kernel(n, k, group, symmetric):
    """Prefill (many rows) unpacks torch's CPU int4 packing to a bfloat16 matrix for one F.linear; it must
    compute what `_weight_int4pack_mm_for_cpu` computes. 200 rows: three full 64-row blocks and a partial one;
    200 columns: padded to the group; 48 rows: partial blocks only."""
    from frontierlm.quant.linear_methods import INT4_DENSE_ROWS, Int4Kernel

    torch.manual_seed(6)
    w = torch.randn(n, k)
    q, scale = formats.quantize_int(w, 4, group)
    zero = torch.randint(-2, 3, scale.shape, dtype=torch.int8) if not symmetric else None
    kern = Int4Kernel(q, scale, zero, group)
    assert kern.layout is not None  # the packing's layout on this CPU was recognised exactly
    x = torch.randn(max(INT4_DENSE_ROWS, 70), k)
    packed, dense = kern(x, dense=False), kern(x, dense=True)
    assert (dense - packed).abs().max() <= 0.01 * packed.abs().max()  # bfloat16 weights vs the kernel's float
    reference = x @ formats.dequantize(q, scale, zero, group=group).t()
    assert (dense - reference).abs().max() <= 0.02 * reference.abs().max()
    torch.testing.assert_close(kern(x), dense, rtol=0, atol=0)  # this many rows take the dense path
