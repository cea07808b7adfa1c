"""Router collapse: a toy MoE language model trained with and without load balancing.

    python benchmarks/router_collapse.py [--steps 1000] [--out docs/router_collapse.png] [--json-out PATH]

A byte-level next-token model (the last 4 bytes of context -> one MoE layer with a residual -> a head) is trained on
Python's own documentation (pydoc_data.topics) four times, from the same seed, initial weights and batches:

  none            softmax top-1 routing, weight = the router probability (Switch Transformer), no balancing
  aux-loss        the same + the Switch/DeepSeek load-balancing loss (MoE.aux_loss_coef, MoE.aux_loss added)
  none-sigmoid    sigmoid scoring (DeepSeek-V3) + a correction bias that is never updated: the control for aux-free
  aux-free        DeepSeek-V3's auxiliary-loss-free balancing: MoE.update_correction_bias(gamma) after every step

The token share of each expert (routed slots / all routed slots) is measured on a fixed held-out batch at steps
0, 100, 500 and 1000, with the held-out loss in bits per byte. About a minute on one CPU thread.
See docs/router_collapse.md for the results.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from frontierlm.layers.moe import MoE, RoutingConfig

CHECKPOINTS = (0, 100, 500, 1000)
RUNS = {  # name -> (scoring, auxiliary loss on, correction bias updated)
    "none": ("softmax", False, False),
    "aux-loss": ("softmax", True, False),
    "none-sigmoid": ("sigmoid", False, False),
    "aux-free": ("sigmoid", False, True),
}


def load_text() -> torch.Tensor:
    from pydoc_data.topics import topics
    data = "\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def split_positions(n: int, ctx: int, block: int = 1024, every: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions whose context and next byte lie in one block; every `every`-th block is held out for evaluation
    (interleaved, so the held-out text is the same mix of topics as the training text)."""
    pos = torch.arange(ctx - 1, n - 1)
    pos = pos[(pos - ctx + 1) // block == (pos + 1) // block]
    held_out = (pos // block) % every == every - 1
    return pos[~held_out], pos[held_out]


def contexts(data: torch.Tensor, pos: torch.Tensor, ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [N] -> (the ctx bytes ending at each position [N, ctx], the byte after it [N])."""
    return data[pos.unsqueeze(1) - torch.arange(ctx)], data[pos + 1]


class ToyMoELM(nn.Module):
    """sum of per-offset byte embeddings -> h + MoE(norm(h)) -> head(norm(h))."""

    def __init__(self, args, scoring: str):
        super().__init__()
        self.ctx = args.ctx
        routing = RoutingConfig(args.experts, args.top_k, scoring=scoring, norm_topk_prob=args.norm_topk)
        self.embed = nn.Embedding(256 * args.ctx, args.hidden)
        self.norm_in, self.norm_out = nn.RMSNorm(args.hidden), nn.RMSNorm(args.hidden)
        self.moe = MoE(args.hidden, args.intermediate, routing, correction_bias=scoring == "sigmoid")
        self.head = nn.Linear(args.hidden, 256, bias=False)
        # MoE parameters start as torch.empty: initialise them (and everything else) here.
        nn.init.normal_(self.embed.weight, std=1.0 / math.sqrt(args.ctx))
        nn.init.normal_(self.moe.gate.weight, std=args.router_std)
        nn.init.normal_(self.moe.experts.w13, std=args.hidden ** -0.5)
        nn.init.normal_(self.moe.experts.w2, std=args.intermediate ** -0.5)
        nn.init.normal_(self.head.weight, std=args.hidden ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x + 256 * torch.arange(self.ctx)).sum(dim=1)
        h = h + self.moe(self.norm_in(h))
        return self.head(self.norm_out(h))


@torch.no_grad()
def evaluate(model: ToyMoELM, x: torch.Tensor, y: torch.Tensor) -> tuple[list[float], float]:
    """(token share per expert, loss in bits per byte) on the held-out batch."""
    model.eval()
    model.moe.reset_expert_counts()
    loss = F.cross_entropy(model(x), y).item() / math.log(2)
    counts = model.moe.expert_counts.float()
    model.train()
    return (counts / counts.sum()).tolist(), loss


def summarize(shares: list[float]) -> dict:
    s = torch.tensor(shares)
    return {"max_share": s.max().item(), "min_share": s.min().item(), "max_over_mean": (s.max() / s.mean()).item(),
            "cv": (s.std(unbiased=False) / s.mean()).item(), "experts_under_1pct": int((s < 0.01).sum())}


def train(name: str, args, data: torch.Tensor, train_pos: torch.Tensor, eval_batch) -> dict:
    scoring, aux, bias_update = RUNS[name]
    aux_coef, gamma = (args.aux_coef if aux else 0.0), (args.gamma if bias_update else None)
    torch.manual_seed(args.seed)  # same initial weights and batches for every run
    model = ToyMoELM(args, scoring)
    model.moe.aux_loss_coef = aux_coef
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed + 1)
    checkpoints = sorted({c for c in CHECKPOINTS if c <= args.steps} | {args.steps})
    record, start = {}, time.perf_counter()
    for step in range(args.steps + 1):
        if step in checkpoints:
            shares, loss = evaluate(model, *eval_batch)
            record[step] = {"shares": shares, "eval_bits_per_byte": loss}
        if step == args.steps:
            break
        x, y = contexts(data, train_pos[torch.randint(len(train_pos), (args.batch,), generator=gen)], args.ctx)
        loss = F.cross_entropy(model(x), y)
        if model.moe.aux_loss is not None:
            loss = loss + model.moe.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if gamma is not None:
            model.moe.update_correction_bias(gamma)
    final = record[args.steps]
    return {"scoring": scoring, "aux_loss_coef": aux_coef, "gamma": gamma, "checkpoints": record,
            "summary": {**summarize(final["shares"]), "final_eval_bits_per_byte": final["eval_bits_per_byte"]},
            "seconds": time.perf_counter() - start}


def print_table(results: dict, experts: int) -> None:
    head = " ".join(f"e{i:<4d}" for i in range(experts))
    print(f"{'run':<13} {'step':>5}  {head} {'max/mean':>8} {'bits/B':>7}")
    for name, r in results.items():
        for step, c in r["checkpoints"].items():
            s = summarize(c["shares"])
            print(f"{name:<13} {step:>5}  " + " ".join(f"{v:.3f}" for v in c["shares"])
                  + f" {s['max_over_mean']:>8.2f} {c['eval_bits_per_byte']:>7.3f}")
    print(f"\n{'run':<13} {'max':>6} {'min':>6} {'max/mean':>8} {'cv':>6} {'<1%':>4} {'final bits/B':>12} {'time':>6}")
    for name, r in results.items():
        s = r["summary"]
        print(f"{name:<13} {s['max_share']:>6.3f} {s['min_share']:>6.3f} {s['max_over_mean']:>8.2f} "
              f"{s['cv']:>6.2f} {s['experts_under_1pct']:>4d} {s['final_eval_bits_per_byte']:>12.3f} "
              f"{r['seconds']:>5.1f}s")


def plot(results: dict, args, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    steps = list(results[names[0]]["checkpoints"])
    fig, axes = plt.subplots(len(names), len(steps), figsize=(3 * len(steps), 2.3 * len(names)),
                             sharex=True, sharey=True, squeeze=False)
    ymax = max(max(c["shares"]) for r in results.values() for c in r["checkpoints"].values())
    for i, name in enumerate(names):
        for j, step in enumerate(steps):
            ax, c = axes[i][j], results[name]["checkpoints"][step]
            ax.bar(range(args.experts), c["shares"], color=f"C{i}")
            ax.axhline(1 / args.experts, color="k", ls="--", lw=0.8)
            ax.set_ylim(0, min(1.0, ymax * 1.1))
            ax.set_title(f"step {step}  ({c['eval_bits_per_byte']:.2f} bits/byte)", fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{name}\ntoken share", fontsize=9)
            if i == len(names) - 1:
                ax.set_xlabel("expert")
            ax.set_xticks(range(args.experts))
    fig.suptitle(f"Router collapse: token share per expert on a held-out batch ({args.experts} experts, "
                 f"top-{args.top_k}; dashed = uniform 1/{args.experts})", fontsize=11)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--out", default="docs/router_collapse.png")
    p.add_argument("--json-out")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {list(RUNS)}")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--norm-topk", action="store_true", help="renormalize the top-k weights to sum to 1 "
                   "(with top-1 this leaves the router without a gradient)")
    p.add_argument("--ctx", type=int, default=4, help="bytes of context")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=128)
    p.add_argument("--batch", type=int, default=1024, help="tokens per step")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--router-std", type=float, default=0.02)
    p.add_argument("--aux-coef", type=float, default=0.01, help="aux-loss run: MoE.aux_loss_coef")
    p.add_argument("--gamma", type=float, default=0.001, help="aux-free run: correction bias update speed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    data = load_text()
    train_pos, eval_pos = split_positions(len(data), args.ctx)
    pick = torch.randperm(len(eval_pos), generator=torch.Generator().manual_seed(1234))[:args.eval_tokens]
    eval_batch = contexts(data, eval_pos[pick], args.ctx)
    start = time.perf_counter()
    results = {name: train(name, args, data, train_pos, eval_batch) for name in args.runs.split(",")}
    total = time.perf_counter() - start
    print_table(results, args.experts)
    print(f"\ntotal {total:.1f}s on {args.threads} thread(s), torch {torch.__version__}, {platform.machine()}")
    if args.out:
        plot(results, args, args.out)
    if args.json_out:
        meta = {k: v for k, v in vars(args).items() if k not in ("out", "json_out")}
        Path(args.json_out).write_text(json.dumps({"args": meta, "torch": torch.__version__, "total_seconds": total,
                                                   "runs": results}, indent=1))
        print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
