"""MTP proposer: DeepSeek-V3's multi-token-prediction module, carried in the target checkpoint.

The module maps (h_{i}, embedding of t_{i+1}) to a hidden state whose logits predict t_{i+2} (h: the target's
final hidden state). It is chained for k > 1 as DeepSeek and vLLM do with one module: the module's own output
stands in for the target's hidden state of the token just proposed. Its attention runs without a cache over a
window of the last `mtp_window` positions, recomputed each round from the target hidden states kept per
request (`observe`); positions before the window are not seen, which can only lower acceptance, never change
an output token."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from frontierlm.spec.adaptive import LinearCost, cost_clock
from frontierlm.spec.proposer import Proposer
from frontierlm.spec.verify import Proposal, RowState, draw


@dataclass
class _Window:
    start: int  # position of hidden[0]
    hidden: torch.Tensor  # [L, H] target hidden states of positions start .. start + L - 1

    @property
    def end(self) -> int:
        return self.start + self.hidden.shape[0]


class MTPProposer(Proposer):
    name = "mtp"
    uses_hidden = True

    def __init__(self, model, window: int, sampler, eos_token_ids):
        if getattr(model, "num_mtp_layers", 0) < 1:
            raise ValueError(f"speculative_config.method 'mtp': the target ({type(model).__name__}) has no "
                             f"multi-token-prediction modules in its checkpoint")
        self.model, self.window = model, window
        self.windows: dict[str, _Window] = {}
        self.sampler, self.eos = sampler, eos_token_ids
        self.cost = LinearCost()  # seconds per chained MTP forward vs requests in it
        self.clock = cost_clock(model.lm_head.weight.device)

    def expected_cost(self, num_requests: int, k: int) -> float:
        return k * self.cost.predict(num_requests)

    def release(self, live: dict) -> None:
        for rid in [r for r in self.windows if r not in live]:
            del self.windows[rid]

    def observe(self, sched, hidden, rows: dict) -> None:
        for rid, (row0, n, pos0) in rows.items():
            if n <= 0:
                continue
            h = hidden[row0:row0 + n]
            w = self.windows.get(rid)
            if w is not None and w.end == pos0:
                h = torch.cat([w.hidden, h])
                pos0 = w.start
            keep = min(h.shape[0], self.window)
            self.windows[rid] = _Window(pos0 + h.shape[0] - keep, h[-keep:].clone())

    @torch.inference_mode()
    def propose(self, requests, ks):
        out = [Proposal([]) for _ in requests]
        groups: dict[int, list] = {}  # window length -> [(index, request, k, ids, positions, prev)]
        for i, (r, k) in enumerate(zip(requests, ks)):
            m = r.num_tokens - 1  # position of the newest token, whose hidden state is not computed yet
            w = self.windows.get(r.request_id)
            if k <= 0 or w is None or w.end != m:
                continue
            s = max(1, w.start + 1, m - self.window + 1)
            if s > m:
                continue
            prev = w.hidden[s - 1 - w.start:m - w.start]
            groups.setdefault(m - s + 1, []).append((i, r, k, r.all_token_ids[s:m + 1], list(range(s - 1, m)), prev))
        for items in groups.values():
            self._chain(items, out)
        return out

    def _chain(self, items, out) -> None:
        dev = items[0][5].device
        ids = torch.tensor([it[3] for it in items], dtype=torch.long, device=dev)
        pos = torch.tensor([it[4] for it in items], dtype=torch.long, device=dev)
        prev = torch.stack([it[5] for it in items])
        drafted: list[list[int]] = [[] for _ in items]
        qs: list[list[torch.Tensor]] = [[] for _ in items]
        alive = list(range(len(items)))
        for j in range(max(it[2] for it in items)):
            t0 = self.clock()
            head, nxt = self.model.mtp_forward(ids, pos, prev, 0, return_next_hidden=True)
            logits = self.model.mtp_logits(head[:, -1])
            tokens, q = draw(self.sampler, logits, [RowState(items[a][1], drafted[a]) for a in alive], self.eos)
            self.cost.observe(len(alive), self.clock() - t0)
            for n, a in enumerate(alive):
                drafted[a].append(tokens[n])
                qs[a].append(q[n])
            keep = [n for n, a in enumerate(alive) if items[a][2] > j + 1]
            if not keep:
                break
            sel = torch.tensor(keep, device=dev)
            new_ids = torch.tensor([[tokens[n]] for n in keep], dtype=torch.long, device=dev)
            ids = torch.cat([ids[sel], new_ids], dim=1)
            pos = torch.cat([pos[sel], pos[sel, -1:] + 1], dim=1)
            prev = torch.cat([prev[sel], nxt[sel, -1:].to(prev.dtype)], dim=1)
            alive = [alive[n] for n in keep]
        for a, (i, r, k, *_rest) in enumerate(items):
            out[i] = Proposal(drafted[a], None if r.sampling_params.greedy else torch.stack(qs[a]))
