"""Serving simulator: FrontierLM's own Scheduler and KVCacheManager on simulated time.

    from frontierlm.plan import get_gpu, load_model_shape
    from frontierlm.sim import simulate, FleetConfig, InstanceConfig, synthetic, RooflineTimer, summarize
    timer = RooflineTimer(load_model_shape("llama-3-8b"), get_gpu("h100"))
    res = simulate(synthetic(200, rate=20.0), timer, FleetConfig(InstanceConfig(num_blocks=20000), replicas=2))
    summarize(res, slo_ttft_ms=250, slo_tpot_ms=25)["goodput"]
"""
from frontierlm.sim.fleet import FleetConfig, Record, SimResult, simulate
from frontierlm.sim.instance import Instance, InstanceConfig, SpecConfig
from frontierlm.sim.metrics import summarize
from frontierlm.sim.timing import BatchShape, ProfileTimer, RooflineTimer
from frontierlm.sim.workload import SimRequest, load_trace, synthetic

__all__ = ["BatchShape", "FleetConfig", "Instance", "InstanceConfig", "ProfileTimer", "Record", "RooflineTimer",
           "SimRequest", "SimResult", "SpecConfig", "load_trace", "simulate", "summarize", "synthetic"]
