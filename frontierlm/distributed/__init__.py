"""Tensor, pipeline and expert parallelism over torch.distributed (gloo on CPU, NCCL on CUDA).

Rank 0 keeps the engine (scheduler, tokenizer, sampler, server) and drives worker processes through
`executor.DriverModel`; the models are the single-device classes built from the parallel layers in `layers.py`,
`moe.py` and `pipeline.py`, which are the plain layers when nothing is parallel. See docs/architecture.md.
"""
