"""The connector interface, split as vLLM's v1 connector is.

The scheduler side runs in the engine's step, on the engine thread, and decides with block ids only:
  - get_num_new_matched_tokens(request, num_computed_tokens): how many more prompt tokens (whole blocks past
    the local prefix-cache hit) will arrive from outside;
  - start_load(request, num_computed_tokens, num_external_tokens): the blocks are allocated; fetch them;
  - take_finished(): requests whose load ended (ok or not), to be scheduled;
  - request_finished(request): may the request's blocks be freed now, or held until a consumer took them;
  - transfer_params(request_id): what the producer tells the world about a held request (kv_transfer_params).
The worker side moves the bytes (a Transport): the producer serves pulls of held blocks, the consumer pulls
into a buffer that the engine thread copies into the cache. Producers are named by address and engine id (a
Peer, from the kv_transfer_params), not by a rank in a fixed group, so instances can die and come back."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import torch


class Peer(NamedTuple):
    """A producer incarnation: where it hosts its KV store, and the engine id it drew when it started."""
    host: str
    port: int
    engine_id: str


class Transport(ABC):
    """Worker side: moves packed blocks between instances."""

    @abstractmethod
    def start(self, serve, done) -> None:
        """Begin serving pulls: `serve(transfer_id, start_block, num_blocks)` returns (packed tensor, digest of the
        prompt tokens up to its last block) or None, then `done(transfer_id, sent)`; both are called on the
        transport's threads, several pulls at once."""

    @abstractmethod
    def address(self) -> dict:
        """This producer as kv_transfer_params name it: remote_host, remote_port, remote_engine_id."""

    @abstractmethod
    def pull(self, peer: Peer, transfer_id: int, start_block: int, num_blocks: int, out: torch.Tensor) -> int:
        """Fill `out` ([num_blocks, numel per block]) with the remote blocks; returns the remote digest of the
        last one. Raises on any failure (refused, peer gone or restarted, timeout). Safe to call from several
        threads at once."""

    @abstractmethod
    def release(self, peer: Peer, transfer_id: int) -> None:
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
