"""What the driver (rank 0) tells the workers each step: a fixed header, then one flat int64 tensor.

The header is all-reduced (the workers contribute zeros), so the driver learns that every rank is alive and
listening before it sends anything else; a dead or hung worker shows up here, within the collective timeout.
A step's payload is the flattened batch the model runner prepared (token ids, positions, KV slots, sequence
starts and lengths, block tables), broadcast as one tensor: no Python objects are pickled on the hot path.
An MTP forward (speculative decoding) packs its rows over the proposer's own cache the same way, and sends the
previous hidden states as a second, float tensor.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from frontierlm.layers.attention import AttentionMetadata

HEADER_LEN = 8
STEP, LOGITS, ALLOC, PING, STOP, KV_BLOCKS = 1, 2, 3, 4, 5, 6  # STEP: one pipeline tick (no fields: no new batch)
MTP, MTP_ALLOC = 7, 8  # the MTP proposer's forward and cache, run by the TP ranks of stage 0 (spec/mtp.py)
COMMANDS = {STEP: "step", LOGITS: "logits", ALLOC: "alloc", PING: "ping", STOP: "stop", KV_BLOCKS: "kv blocks",
            MTP: "mtp forward", MTP_ALLOC: "mtp cache"}


def send_header(cmd: int, *fields: int, device: torch.device, group) -> None:
    header = torch.zeros(HEADER_LEN, dtype=torch.int64, device=device)
    header[0] = cmd
    if fields:
        header[1:1 + len(fields)] = torch.tensor(fields, dtype=torch.int64)
    dist.all_reduce(header, group=group)


def receive_header(device: torch.device, group) -> list[int]:
    header = torch.zeros(HEADER_LEN, dtype=torch.int64, device=device)
    dist.all_reduce(header, group=group)
    return header.tolist()


def step_fields(input_ids: torch.Tensor, meta: AttentionMetadata) -> tuple[int, ...]:
    return (input_ids.shape[0], len(meta.query_lens_cpu), meta.block_tables.shape[1], meta.max_query_len,
            meta.max_seq_len, meta.block_size)


def pack_step(input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    parts = [input_ids, positions, meta.slot_mapping, meta.query_start_loc, meta.seq_lens, meta.block_tables.flatten()]
    return torch.cat([p.to(torch.int64) for p in parts])


def payload_size(num_tokens: int, num_seqs: int, width: int) -> int:
    return 3 * num_tokens + (num_seqs + 1) + num_seqs + num_seqs * width


def unpack_step(payload: torch.Tensor, num_tokens: int, num_seqs: int, width: int, max_query_len: int,
                max_seq_len: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    ids, pos, slots, qsl, seq_lens, tables = payload.split(
        [num_tokens, num_tokens, num_tokens, num_seqs + 1, num_seqs, num_seqs * width])
    qsl, seq_lens = qsl.to(torch.int32), seq_lens.to(torch.int32)
    starts, lens = qsl.tolist(), seq_lens.tolist()  # one host copy (none on CPU)
    meta = AttentionMetadata(
        slot_mapping=slots, query_start_loc=qsl, seq_lens=seq_lens,
        block_tables=tables.view(num_seqs, width).to(torch.int32),
        query_lens_cpu=[b - a for a, b in zip(starts, starts[1:])], seq_lens_cpu=lens,
        max_query_len=max_query_len, max_seq_len=max_seq_len, block_size=block_size)
    return ids, pos, meta
