"""Copy a trained model directory into the package as bfloat16 (how frontierlm/assets/demo and draft were made).

  python scripts/pack_model.py /tmp/mine/demo-train frontierlm/assets/demo
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

KEEP = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "chat_template.jinja")


def pack(src: str, dst: str) -> None:
    src_dir, dst_dir = Path(src), Path(dst)
    dst_dir.mkdir(parents=True, exist_ok=True)
    for name in KEEP:
        if (src_dir / name).is_file():
            shutil.copy(src_dir / name, dst_dir / name)
    # Floating tensors to bfloat16; DeepSeek-V3's selection bias stays float32 (it breaks near-ties).
    weights = {k: (v if k.endswith("e_score_correction_bias") or not v.is_floating_point() else v.to(torch.bfloat16))
               for k, v in load_file(str(src_dir / "model.safetensors")).items()}
    save_file(weights, str(dst_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst_dir / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    cfg.pop("torch_dtype", None)
    (dst_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    total = sum(f.stat().st_size for f in dst_dir.iterdir())
    print(f"{src_dir} -> {dst_dir}: {len(weights)} tensors, {total / 2**20:.1f} MiB")


if __name__ == "__main__":
    pack(*sys.argv[1:3])
