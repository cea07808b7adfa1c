"""KV-cache transfer between instances (disaggregated prefill / decode): the connector interface, split the
way vLLM's v1 connector is (scheduler side / worker side), and its transports."""
