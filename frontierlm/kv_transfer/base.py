"""The connector interface, split as vLLM's v1 connector is.

The scheduler side runs in the engine's step, on the engine thread, and decides with block ids only:
  - get_num_new_matched_tokens(request, num_computed_tokens): how many more prompt tokens (whole blocks past
    the local prefix-cache hit) will arrive from outside;
  - start_load(request, num_computed_tokens, num_external_tokens): the blocks are allocated; fetch them;
  - take_finished(): requests whose load ended (ok or not), to be scheduled;
  - request_finished(request): may the request's blocks be freed now, or held until a consumer took them;
  - transfer_params(request_id): what the producer tells the world about a held request (kv_transfer_params).
The worker side moves the bytes (a Transport): the producer serves pulls of held blocks, the consumer pulls
into a buffer that the engine thread copies into the cache."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Transport(ABC):
    """Worker side: moves packed blocks between instances."""

    @abstractmethod
    def start(self, serve, done) -> None:
        """Begin serving pulls: `serve(transfer_id, start_block, num_blocks)` returns (packed tensor, digest of the
        prompt tokens up to its last block) or None, then `done(transfer_id, sent)`; both are called on the transport's thread."""

    @abstractmethod
    def pull(self, remote_rank: int, transfer_id: int, start_block: int, num_blocks: int,
             out: torch.Tensor) -> int:
        """Fill `out` ([num_blocks, numel per block]) with the remote blocks; returns the remote digest of the
        last one. Raises on any failure (refused, peer gone, timeout)."""

    @abstractmethod
    def release(self, remote_rank: int, transfer_id: int) -> None:
        """Tell the producer its held blocks are not needed (the consumer's cache had them all)."""

    def close(self) -> None:
        pass


class KVConnectorScheduler(ABC):
    @abstractmethod
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> int: ...

    @abstractmethod
    def start_load(self, request, num_computed_tokens: int, num_external_tokens: int) -> None: ...

    @abstractmethod
    def take_finished(self) -> list: ...

    @abstractmethod
    def cancel_load(self, request) -> None: ...

    @abstractmethod
    def request_finished(self, request) -> bool: ...

    @abstractmethod
    def transfer_params(self, request_id: str) -> dict | None: ...
