"""`frontierlm quantize IN_DIR OUT_DIR --scheme fp8 | fp8-block | int8 | int4 [--group-size G]` (export.py)."""
from __future__ import annotations

import json
from pathlib import Path


def add_parsers(sub) -> None:
    from frontierlm.quant.export import SCHEMES

    p = sub.add_parser("quantize", help="write a quantized copy of a float checkpoint (compressed-tensors or "
                                        "DeepSeek-V3 FP8 blocks)")
    p.add_argument("in_dir", help="float HF model directory (e.g. what `frontierlm train` wrote)")
    p.add_argument("out_dir", help="new directory for the quantized checkpoint")
    p.add_argument("--scheme", required=True, choices=SCHEMES,
                   help="fp8: per-channel FP8 (compressed-tensors); fp8-block: DeepSeek-V3 128x128 blocks; "
                        "int8 / int4: weight-only pack-quantized")
    p.add_argument("--group-size", type=int, default=None,
                   help="columns per scale for int8 / int4 (default: per channel for int8, 32 for int4)")


def cmd_quantize(args) -> int:
    from frontierlm.config import check_model_dir
    from frontierlm.quant.export import quantize_checkpoint

    check_model_dir(args.in_dir)
    summary = quantize_checkpoint(Path(args.in_dir), Path(args.out_dir), args.scheme, args.group_size)
    print(json.dumps(summary))
    return 0


COMMANDS = {"quantize": cmd_quantize}
