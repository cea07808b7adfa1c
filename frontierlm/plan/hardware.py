"""GPU presets for the planner and the simulator's roofline.

Figures are the vendors' datasheet numbers for dense math (the "with sparsity" figures are twice these):
- A100 40 GB / 80 GB SXM4: NVIDIA A100 Tensor Core GPU datasheet (2021): BF16 312 TFLOPS, HBM2 1,555 GB/s
  (40 GB), HBM2e 2,039 GB/s (80 GB), NVLink 600 GB/s; no FP8 tensor cores.
- H100 SXM5: NVIDIA H100 Tensor Core GPU datasheet: 80 GB HBM3, 3.35 TB/s, BF16 1,979 / FP8 3,958 TFLOPS
  with sparsity (989.5 / 1,979 dense), NVLink 900 GB/s.
- H200 SXM: NVIDIA H200 Tensor Core GPU datasheet: 141 GB HBM3e, 4.8 TB/s, same tensor cores as H100,
  NVLink 900 GB/s.
- L4: NVIDIA L4 datasheet: 24 GB GDDR6, 300 GB/s, BF16 242 / FP8 485 TFLOPS with sparsity (121 / 242.5 dense),
  PCIe Gen4 x16 (64 GB/s both directions), no NVLink.
- RTX 4090: NVIDIA Ada Lovelace architecture whitepaper (v2.1, appendix table): 24 GB GDDR6X, 1,008 GB/s,
  BF16 165.2 TFLOPS dense (FP32 accumulate), FP8 330.3 TFLOPS dense (FP16 accumulate); PCIe Gen4 x16, no NVLink.

Units: vendors quote memory capacity in GB that are in fact GiB of HBM/GDDR (an "80 GB" H100 holds 80 * 2**30
bytes; the driver leaves about 1% less usable), bandwidth in decimal GB/s and TB/s, and link bandwidth summed over
both directions. Here `memory_bytes` is binary (GiB * 2**30), every rate is decimal per second, and
`interconnect_bw` is one direction (half the datasheet's bidirectional figure), which is what a ring collective
moves per GPU.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

GiB = 2**30
GB = 10**9
TERA = 10**12


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int
    mem_bw: float  # bytes/s
    bf16_flops: float  # dense FLOP/s
    fp8_flops: float | None  # dense FLOP/s; None where the GPU has no FP8 tensor cores
    interconnect_bw: float  # bytes/s, one direction per GPU
    interconnect: str

    def flops(self, dtype: str) -> float:
        """Peak dense FLOP/s for matmuls in `dtype` (fp8 falls back to bf16 math where there is no FP8)."""
        if dtype in ("fp8", "int8", "int4") and self.fp8_flops is not None:
            return self.fp8_flops
        return self.bf16_flops

    def to_dict(self) -> dict:
        return asdict(self)


GPUS: dict[str, GPU] = {g.name: g for g in [
    GPU("a100-40gb", 40 * GiB, 1555 * GB, 312 * TERA, None, 300 * GB, "NVLink 3 (600 GB/s)"),
    GPU("a100-80gb", 80 * GiB, 2039 * GB, 312 * TERA, None, 300 * GB, "NVLink 3 (600 GB/s)"),
    GPU("h100", 80 * GiB, 3350 * GB, 989.5 * TERA, 1979 * TERA, 450 * GB, "NVLink 4 (900 GB/s)"),
    GPU("h200", 141 * GiB, 4800 * GB, 989.5 * TERA, 1979 * TERA, 450 * GB, "NVLink 4 (900 GB/s)"),
    GPU("l4", 24 * GiB, 300 * GB, 121 * TERA, 242.5 * TERA, 32 * GB, "PCIe Gen4 x16 (64 GB/s)"),
    GPU("rtx4090", 24 * GiB, 1008 * GB, 165.2 * TERA, 330.3 * TERA, 32 * GB, "PCIe Gen4 x16 (64 GB/s)"),
]}
ALIASES = {"a100": "a100-80gb", "h100-sxm": "h100", "h200-sxm": "h200", "4090": "rtx4090"}


def get_gpu(name: str | None = None, memory_gb: float | None = None, bandwidth_gbps: float | None = None,
            tflops: float | None = None, fp8_tflops: float | None = None,
            interconnect_gbps: float | None = None) -> GPU:
    """A preset by name, with any explicit number replacing the preset's; without a name every number is needed.
    memory_gb is GiB (as vendors mean it), bandwidths are decimal GB/s, tflops dense."""
    explicit = {"memory_gb": memory_gb, "bandwidth_gbps": bandwidth_gbps, "tflops": tflops}
    if name is None:
        missing = [k for k, v in explicit.items() if v is None]
        if missing:
            raise ValueError("no GPU preset given and the explicit GPU lacks " + ", ".join(f"--{k.replace('_', '-')}"
                             for k in missing) + f" (presets: {', '.join(GPUS)})")
        base = GPU("custom", 0, 0.0, 0.0, None, 0.0, "custom")
    else:
        key = ALIASES.get(name.lower(), name.lower())
        if key not in GPUS:
            raise ValueError(f"unknown GPU preset {name!r}; presets: {', '.join(GPUS)}")
        base = GPUS[key]
    for label, v in {**explicit, "fp8_tflops": fp8_tflops, "interconnect_gbps": interconnect_gbps}.items():
        if v is not None and not v > 0:
            raise ValueError(f"{label} must be > 0, got {v!r}")
    return GPU(
        base.name if not any(v is not None for v in explicit.values()) else f"{base.name}*",
        int(memory_gb * GiB) if memory_gb is not None else base.memory_bytes,
        bandwidth_gbps * GB if bandwidth_gbps is not None else base.mem_bw,
        tflops * TERA if tflops is not None else base.bf16_flops,
        fp8_tflops * TERA if fp8_tflops is not None else base.fp8_flops,
        interconnect_gbps * GB if interconnect_gbps is not None else (base.interconnect_bw or 32 * GB),
        base.interconnect)
