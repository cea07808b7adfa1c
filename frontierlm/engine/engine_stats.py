"""The engine's read-only introspection (counters for /metrics, the dashboard and the shutdown log), kept apart
from the request path of llm_engine.py. A mixin of LLMEngine: it reads the scheduler, KV cache, proposer and
model that the engine builds."""
from __future__ import annotations


class EngineStats:
    def get_stats(self) -> dict:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_cache_usage": self.kv.usage,
            "num_blocks": self.kv.num_blocks,
            "num_free_blocks": self.kv.pool.num_free_blocks,
            "prefix_cache_queries": self.kv.prefix_queries,
            "prefix_cache_hits": self.kv.prefix_hits,
            "num_preemptions": self.scheduler.num_preemptions,
            # structured-output requests per backend since start ({} before the first one)
            "structured_output_requests": dict(self.grammar_backend.served) if self.grammar_backend else {},
            **({"spec_decode": self.spec.stats.as_dict()} if self.spec is not None else {}),
            **({"kv_transfer": self.kv_connector.get_stats()} if self.kv_connector is not None else {}),
        }

    def spec_decode_summary(self) -> str | None:
        """One line on speculative decoding so far (logged at shutdown), or None when it is off."""
        return None if self.spec is None else f"speculative decoding: {self.spec.stats.summary()}"

    def expert_load(self) -> list[list[int]]:
        """MoE models: tokens routed to each expert, per MoE layer, since start (empty for dense models).
        Counted on the device every forward; this is the one copy to the host, so call it when you need it
        rather than every step."""
        return self.runner.model.expert_load()

    def expert_load_per_rank(self) -> list[list[int]]:
        """Expert parallelism: tokens routed to each rank's experts, per MoE layer ([] without it)."""
        if not self.config.enable_expert_parallel:
            return []
        from frontierlm.distributed.moe import load_per_rank

        return load_per_rank(self.expert_load(), self.config.tensor_parallel_size)

    def expert_layers(self) -> list[int]:
        """The model's own layer number of each row of expert_load() (dense layers and MTP modules skipped)."""
        return self.runner.model.expert_layers()

