"""`--kv-transfer-config` / `kv_transfer_config=`: vLLM's field names."""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field, fields

KV_ROLES = ("kv_producer", "kv_consumer", "kv_both")
CONNECTORS = ("TorchDistributedConnector", "MooncakeConnector")
EXTRA_KEYS = {"hold_timeout_s": 30.0, "transfer_timeout_s": 10.0, "backend": "gloo"}


@dataclass
class KVTransferConfig:
    kv_connector: str = "TorchDistributedConnector"
    kv_role: str = "kv_both"
    # vLLM's fields, checked and kept; the connectors here need neither: a consumer pairs with a producer on its
    # first pull (torch_dist.py), so instances can join, die and come back without a fixed group
    kv_rank: int = 0
    kv_parallel_size: int = 2
    kv_ip: str = "127.0.0.1"  # where a producer hosts its KV store (and the address its kv_transfer_params name)
    kv_port: int = 14579  # that store's port: one per producer
    # hold_timeout_s: how long a producer keeps a finished prompt's blocks for a consumer to pull;
    # transfer_timeout_s: how long one pull may take; backend: "gloo" (CPU caches) or "nccl" (CUDA caches, nccl.py)
    kv_connector_extra_config: dict = field(default_factory=dict)

    @classmethod
    def from_any(cls, value) -> "KVTransferConfig":
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise ValueError(f"kv_transfer_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"kv_transfer_config must be a JSON object, got {type(value).__name__}")
        names = [f.name for f in fields(cls)]
        for key in value:
            if key not in names:
                close = difflib.get_close_matches(key, names, 1)
                raise ValueError(f"kv_transfer_config: unknown field {key!r}"
                                 + (f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(names)}"))
        return cls(**value)

    def __post_init__(self):
        if self.kv_connector not in CONNECTORS:
            raise ValueError(f"kv_transfer_config.kv_connector must be one of {', '.join(CONNECTORS)}, got "
                             f"{self.kv_connector!r}")
        if self.kv_role not in KV_ROLES:
            raise ValueError(f"kv_transfer_config.kv_role must be one of {', '.join(KV_ROLES)}, got {self.kv_role!r}")
        for name in ("kv_rank", "kv_parallel_size", "kv_port"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"kv_transfer_config.{name} must be a non-negative integer, got {v!r}")
        if self.kv_parallel_size < 2 or self.kv_rank >= self.kv_parallel_size:
            raise ValueError(f"kv_transfer_config: kv_rank must be < kv_parallel_size (>= 2), got rank "
                             f"{self.kv_rank} of {self.kv_parallel_size}")
        if not isinstance(self.kv_connector_extra_config, dict):
            raise ValueError("kv_transfer_config.kv_connector_extra_config must be an object")
        for key, value in self.kv_connector_extra_config.items():
            if key not in EXTRA_KEYS:
                raise ValueError(f"kv_transfer_config.kv_connector_extra_config: unknown key {key!r}; known: "
                                 f"{', '.join(EXTRA_KEYS)}")
            if key == "backend" and value not in ("gloo", "nccl"):
                raise ValueError(f"kv_transfer_config.kv_connector_extra_config.backend must be 'gloo' (CPU caches) "
                                 f"or 'nccl' (CUDA caches), got {value!r}")
            if key.endswith("_s") and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"kv_transfer_config.kv_connector_extra_config.{key} must be > 0, got {value!r}")

    def extra(self, key: str):
        return self.kv_connector_extra_config.get(key, EXTRA_KEYS[key])

    @property
    def is_producer(self) -> bool:
        return self.kv_role in ("kv_producer", "kv_both")

    @property
    def is_consumer(self) -> bool:
        return self.kv_role in ("kv_consumer", "kv_both")
