"""`frontierlm router` flags (light imports: `frontierlm --help` must stay fast)."""
from __future__ import annotations

import argparse

POLICIES = ("round_robin", "least_loaded", "cache_aware")


def add_router_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--worker", action="append", metavar="URL",
                        help="an instance (`frontierlm serve`) for plain data parallelism (repeat for each)")
    parser.add_argument("--prefill", action="append", metavar="URL",
                        help="a prefill instance (serve --kv-transfer-config with kv_role kv_producer); repeat")
    parser.add_argument("--decode", action="append", metavar="URL",
                        help="a decode instance (kv_role kv_consumer); repeat")
    parser.add_argument("--policy", choices=POLICIES, default="cache_aware",
                        help="round_robin; least_loaded (the instances' queue gauges); cache_aware (where the "
                             "prompt's prefix went before, unless the load is out of balance)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--health-interval", type=float, default=1.0, help="seconds between health polls")
    parser.add_argument("--upstream-timeout", type=float, default=600.0,
                        help="seconds an instance may stay silent on a request before it counts as failed")
    parser.add_argument("--max-migrations", type=int, default=1,
                        help="times a stream may be resumed on another instance after its own died (0: never)")
    parser.add_argument("--uvicorn-log-level", default="warning")


def check_router_args(args: argparse.Namespace) -> None:
    workers, prefills, decodes = args.worker or [], args.prefill or [], args.decode or []
    if workers and (prefills or decodes):
        raise ValueError("give --worker URLs (data parallel) or --prefill and --decode URLs, not both")
    if not workers and not (prefills and decodes):
        raise ValueError("give at least one --worker URL, or at least one --prefill and one --decode URL")
    for url in workers + prefills + decodes:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"instance URL {url!r} must start with http:// or https://")
    if len(set(workers + prefills + decodes)) != len(workers + prefills + decodes):
        raise ValueError("an instance URL is given twice")
    if args.health_interval <= 0 or args.upstream_timeout <= 0 or args.max_migrations < 0:
        raise ValueError("--health-interval and --upstream-timeout must be > 0, --max-migrations >= 0")
