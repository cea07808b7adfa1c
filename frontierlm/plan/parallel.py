"""The parallelism advisor: the simplest layout that fits a model on N GPUs, with the reason for each choice.

Training, in the order a practitioner tries them (each step costs more communication than the one before):
1. data parallel alone (ZeRO-0), then ZeRO-1 and ZeRO-2: they move the same bytes per step as plain DP
   (a reduce-scatter plus an all-gather instead of an all-reduce);
2. for MoE, expert parallelism: routed experts are most of the weights but a token visits only top_k of them,
   so sharding experts across ranks and moving tokens (all-to-all) beats gathering every expert's weights;
3. ZeRO-3 / FSDP (all-gathers every layer's weights each forward and backward, +50% traffic over DP): chosen
   within one node, or when the weights fit one GPU anyway;
4. otherwise tensor parallelism inside a node (it needs NVLink: two all-reduces per layer) and pipeline stages
   across nodes, data parallel with ZeRO-1 over what is left.
A GPU counts as full at `headroom` (0.9) of its memory: CUDA context, NCCL buffers and fragmentation take the rest.
"""
from __future__ import annotations

from frontierlm.plan.hardware import GPU
from frontierlm.plan.model import ModelShape
from frontierlm.plan.train import activations, model_states, precision_bytes

GB = 10**9


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _layout(shape: ModelShape, params: float, precision: str, tp: int, pp: int, ep: int, dp: int, stage: int,
            seq_len: int, micro_batch: int, limit: float) -> dict:
    """Per-GPU memory of one layout, with selective recomputation if that fits and full recomputation if not."""
    experts = shape.routed_expert_params() if ep > 1 else 0
    dense = (params - experts) / (tp * pp)
    expert_share = experts / (tp * pp * ep)
    # dense weights are replicated over dp (sharded by ZeRO over dp); each expert shard over dp / ep ranks
    states = model_states(dense, precision, stage, dp).total + \
        model_states(expert_share, precision, stage, max(1, dp // ep)).total
    if stage >= 3:  # one layer's full weights are gathered at a time
        states += max(shape.layer_params(i) for i in range(shape.mc.num_layers)) * 2 / tp
    for recompute in ("selective", "full"):
        acts = activations(shape, seq_len, micro_batch, recompute, precision, tp)["total"]
        if states + acts <= limit:
            break
    return {"tp": tp, "pp": pp, "ep": ep, "dp": dp, "zero_stage": stage, "recompute": recompute,
            "states_GB": states / GB, "activations_GB": acts / GB, "per_gpu_GB": (states + acts) / GB}


def advise_training(shape: ModelShape, gpu: GPU, num_gpus: int, seq_len: int = 4096, micro_batch: int = 1,
                    precision: str = "mixed", gpus_per_node: int = 8, headroom: float = 0.9,
                    params: float | None = None) -> dict:
    if num_gpus <= 0 or gpus_per_node <= 0:
        raise ValueError(f"num_gpus and gpus_per_node must be positive, got {num_gpus} and {gpus_per_node}")
    params = params or shape.num_params()
    limit = gpu.memory_bytes * headroom
    reasons: list[str] = []
    weights_bf16 = params * 2

    def fits(lay):
        return lay["per_gpu_GB"] * GB <= limit

    def result(lay, why):
        reasons.append(why)
        lay.update(model=shape.name, gpu=gpu.name, num_gpus=num_gpus, limit_GB=limit / GB, precision=precision,
                   seq_len=seq_len, micro_batch=micro_batch, reasons=reasons)
        return lay

    args = (shape, params, precision)
    tail = (seq_len, micro_batch, limit)
    for stage in (0, 1, 2):
        lay = _layout(*args, 1, 1, 1, num_gpus, stage, *tail)
        if fits(lay):
            what = "replicated model states" if stage == 0 else f"ZeRO-{stage} sharding over {num_gpus} GPUs"
            return result(lay, f"data parallelism alone works: {what} + activations = "
                               f"{lay['per_gpu_GB']:.1f} GB per GPU <= {limit / GB:.1f} GB")
        reasons.append(f"ZeRO-{stage} data parallel needs {lay['per_gpu_GB']:.1f} GB per GPU > {limit / GB:.1f} GB")

    if shape.is_moe:
        share = shape.routed_expert_params() / params
        for ep in [d for d in _divisors(shape.num_experts) if d > 1 and num_gpus % d == 0]:
            lay = _layout(*args, 1, 1, ep, num_gpus, 1, *tail)
            if fits(lay):
                return result(lay, f"expert parallelism {ep}: routed experts are {share:.0%} of the weights but each "
                                   f"token visits {shape.experts_per_token} of {shape.num_experts}, so experts are "
                                   f"sharded and tokens moved (all-to-all); {lay['per_gpu_GB']:.1f} GB per GPU")
        reasons.append("expert parallelism alone does not fit")

    lay = _layout(*args, 1, 1, 1, num_gpus, 3, *tail)
    single_node = num_gpus <= gpus_per_node
    if fits(lay) and (single_node or weights_bf16 <= limit):
        where = "within one node" if single_node else "and the bf16 weights fit one GPU"
        return result(lay, f"ZeRO-3 / FSDP over {num_gpus} GPUs {where}: {lay['per_gpu_GB']:.1f} GB per GPU")
    if fits(lay):
        reasons.append(f"ZeRO-3 would fit ({lay['per_gpu_GB']:.1f} GB) but would all-gather {weights_bf16 / GB:.0f} "
                       "GB of weights across nodes every step; tensor parallelism inside nodes moves less")

    tps = [t for t in (1, 2, 4, 8, 16) if t <= min(gpus_per_node, num_gpus) and num_gpus % t == 0
           and shape.mc.num_heads % t == 0]
    # Megatron's rule: the fewest model-parallel GPUs, and for the same count TP (inside a node) before PP
    candidates = sorted(((tp, pp) for tp in tps for pp in _divisors(num_gpus // tp) if pp <= shape.mc.num_layers),
                        key=lambda c: (c[0] * c[1], c[1]))
    best = None
    for tp, pp in candidates:
        dp = num_gpus // (tp * pp)
        ep = max((d for d in _divisors(shape.num_experts) if dp % d == 0), default=1) if shape.is_moe else 1
        lay = _layout(*args, tp, pp, ep, dp, 1, *tail)
        if fits(lay):
            best = lay
            break
    if best is None:
        min_gpus = params * sum(precision_bytes(precision)) / limit
        raise ValueError(f"{shape.name} ({params / 1e9:.1f}B params, {precision}) does not fit on {num_gpus} x "
                         f"{gpu.name} ({limit / GB:.0f} GB usable each) with any TP x PP x DP layout; about "
                         f"{min_gpus:.0f} GPUs of this size are needed for its model states alone")
    tp, pp, dp = best["tp"], best["pp"], best["dp"]
    if tp > 1:
        reasons.append(f"tensor parallel {tp} (inside a node of {gpus_per_node}, over {gpu.interconnect}): the bf16 "
                       f"weights ({weights_bf16 / GB:.0f} GB) exceed one GPU, and TP splits weights and activations")
    if pp > 1:
        where = "across nodes" if tp * pp > gpus_per_node else "inside the node"
        reasons.append(f"{pp} pipeline stages {where}: TP {tp} alone still needs more than {limit / GB:.0f} GB "
                       "per GPU; stages pass only activations between them")
    if best["ep"] > 1:
        reasons.append(f"expert parallelism {best['ep']} inside the data-parallel group")
    return result(best, f"data parallel {dp} with ZeRO-1 over the rest: {best['per_gpu_GB']:.1f} GB per GPU")


def advise_serving(shape: ModelShape, gpu: GPU, num_gpus: int, context: int, weight_dtype: str = "bf16",
                   kv_dtype: str = "bf16", min_batch: int = 1, gpus_per_node: int = 8,
                   memory_utilization: float = 0.9) -> dict:
    """Smallest TP (then PP) whose replica holds the weights and `min_batch` sequences of `context` tokens;
    the other GPUs become data-parallel replicas behind a router."""
    from frontierlm.plan.inference import serve_report

    reasons = []
    for tp in [t for t in (1, 2, 4, 8) if t <= min(num_gpus, gpus_per_node) and shape.mc.num_heads % t == 0]:
        rep = serve_report(shape, gpu, context, weight_dtype, kv_dtype, memory_utilization, tp)
        if rep.get("max_concurrent_requests", 0) >= min_batch:
            reasons.append(f"tensor parallel {tp}: the smallest degree whose weights ({rep['weights_per_gpu']['GB']:.1f}"
                           f" GB per GPU) leave room for {rep['max_concurrent_requests']} sequences of {context}"
                           f" tokens (asked for {min_batch})")
            replicas = num_gpus // tp
            reasons.append(f"{replicas} data-parallel replicas: replicas share nothing, so throughput scales with them")
            return {"model": shape.name, "gpu": gpu.name, "num_gpus": num_gpus, "tp": tp, "pp": 1,
                    "replicas": replicas, "max_concurrent_per_replica": rep["max_concurrent_requests"],
                    "reasons": reasons}
        reasons.append(f"TP {tp}: {rep.get('reason') or str(rep.get('max_concurrent_requests')) + ' sequences fit'}")
    raise ValueError(f"{shape.name} does not fit for serving on {num_gpus} x {gpu.name} with TP up to "
                     f"{min(num_gpus, gpus_per_node)} ({'; '.join(reasons)}); pipeline stages across nodes are needed")
