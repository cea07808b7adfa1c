"""quant/sharding.py, pure CPU, no processes: the shard of a quantized checkpoint tensor read through a Region
(from a lazy safetensors slice) dequantizes to exactly the matching slice of the whole dequantized matrix, and
a region that would cut a quantization group or an FP8 column block is refused with the numbers."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from frontierlm.quant import formats, sharding
from frontierlm.quant.config import QuantConfig, WeightScheme
from frontierlm.quant.export import _ct_scheme
from frontierlm.quant.loading import QuantLoad
from frontierlm.quant.sharding import Region

N, K = 200, 256
SCHEMES = {"int4": WeightScheme("int", 4, "group", 32), "int8": WeightScheme("int", 8, "channel"),
           "fp8": WeightScheme("float", 8, "channel"), "fp8-block": WeightScheme("float", 8, "block", block=(128, 128))}


def _write(tmp_path, scheme: str):
    """One quantized module `m` as `frontierlm quantize` writes it; returns (path, the QuantLoad's oracle)."""
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(0))
    s = SCHEMES[scheme]
    if scheme == "fp8-block":
        values, scale = formats.quantize_fp8(w, "block", (128, 128))
        tensors, cfg = {"m.weight": values, "m.weight_scale_inv": scale}, QuantConfig("fp8", [(["Linear"], s)])
    else:
        from compressed_tensors.compressors import BaseCompressor

        fmt = "float-quantized" if scheme == "fp8" else "pack-quantized"
        scale = formats.quantize_fp8(w, "channel")[1] if scheme == "fp8" else \
            formats.quantize_int(w, s.bits, s.group_size)[1]
        state = {"weight": w, "weight_scale": scale, "weight_zero_point": torch.zeros(scale.shape, dtype=torch.int8)}
        ct = _ct_scheme(scheme, s.group_size)
        tensors = {f"m.{k}": v.contiguous() for k, v in BaseCompressor.load_from_registry(fmt).compress(state, ct).items()}
        cfg = QuantConfig("compressed-tensors", [(["Linear"], s)], checkpoint_format=fmt)
    path = str(tmp_path / f"{scheme}.safetensors")
    save_file(tensors, path)
    return path, QuantLoad(cfg, [path])._dequantize("m")


def _shard(path, scheme, r: Region) -> torch.Tensor:
    s = SCHEMES[scheme]
    with safe_open(path, framework="pt") as f:
        if "m.weight_packed" in f.keys():
            vals = sharding.packed_values(f.get_slice("m.weight_packed"), r, s.bits)
            sharding.check_shape(f.get_slice("m.weight_shape"), r)
        else:
            vals = sharding.values(f.get_slice("m.weight"), r)
        name = "m.weight_scale_inv" if "m.weight_scale_inv" in f.keys() else "m.weight_scale"
        return sharding.dequantized(r, s, vals, sharding.scales(f.get_slice(name), r, s))


def _region(rows, cols) -> Region:
    return Region(rows[0], rows[1], cols[0], cols[1], N, K)


# (rows, cols) = ((start, size), (start, size)): halves (TP2 column / row parallel), a row range inside and across
# 128-row blocks, and for per-channel int8 a column range that starts and ends inside an int32 word (4 per word)
CASES = {"int4": [((0, 100), (0, K)), ((100, 100), (0, K)), ((0, N), (128, 128)), ((7, 50), (64, 96))],
         "int8": [((0, 100), (0, K)), ((0, N), (128, 128)), ((5, 20), (2, 101))],
         "fp8": [((100, 100), (0, K)), ((0, N), (3, 50))],
         "fp8-block": [((72, 100), (0, K)), ((0, N), (128, 128)), ((130, 70), (0, 128))]}


@pytest.mark.parametrize("scheme", list(CASES))
def test_a_shard_is_the_slice_of_the_whole_matrix(tmp_path, scheme):
    path, whole = _write(tmp_path, scheme)
    assert torch.equal(_shard(path, scheme, Region.whole(N, K)), whole)
    for rows, cols in CASES[scheme]:
        before = sharding.COUNTER.bytes
        got = _shard(path, scheme, _region(rows, cols))
        assert torch.equal(got, whole[rows[0]:rows[0] + rows[1], cols[0]:cols[0] + cols[1]]), (rows, cols)
        if (rows, cols) == ((0, 100), (0, K)):  # half the rows: about half the bytes, read from the slices
            with safe_open(path, framework="pt") as f:
                total = sum(f.get_tensor(n).numel() * f.get_tensor(n).element_size() for n in f.keys())
            assert 0.45 * total < sharding.COUNTER.bytes - before < 0.55 * total


def test_regions_that_cut_a_group_or_a_block_are_refused(tmp_path):
    path, _ = _write(tmp_path, "int4")
    with pytest.raises(ValueError, match=r"columns \[16, 144\) of 256 do not start and end on the checkpoint's "
                                         r"quantization groups of 32"):
        _shard(path, "int4", _region((0, N), (16, 128)))
    path, _ = _write(tmp_path, "fp8-block")
    with pytest.raises(ValueError, match=r"columns \[64, 192\) of 256 .* scale blocks of 128"):
        _shard(path, "fp8-block", _region((0, N), (64, 128)))
