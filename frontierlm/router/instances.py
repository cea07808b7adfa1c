"""The instances behind the router and their health: each is polled (`/health` for liveness and draining,
`/metrics` for the queue and KV gauges the least-loaded policy reads). A dead or draining instance gets no new
requests; one that stops answering has its in-flight streams closed, so nothing waits on it forever. A restart
(a new start id on /health) is counted, so cache_aware forgets what it sent to the old process."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx

from frontierlm.logger import init_logger
from frontierlm.server.middleware import START_ID_HEADER

logger = init_logger(__name__)

RETRYABLE = {429, 500, 502, 503, 504}  # statuses that say the instance could not serve it now; another one may
GAUGES = {"frontierlm:num_requests_running": "num_running", "frontierlm:num_requests_waiting": "num_waiting",
          "frontierlm:kv_cache_usage_perc": "kv_usage"}


@dataclass(eq=False)
class Instance:
    url: str
    role: str  # "worker" (plain data parallel), "prefill" or "decode"
    healthy: bool = False  # until the first poll answers
    draining: bool = False
    failures: int = 0  # consecutive failed polls or requests
    num_running: float = 0.0  # the instance's own gauges, as of the last poll
    num_waiting: float = 0.0
    kv_usage: float = 0.0
    in_flight: int = 0  # requests the router has open on it now (fresher than the gauges)
    last_poll: float = 0.0
    streams: set = field(default_factory=set)  # open httpx responses, closed if the instance dies
    start_id: str | None = None  # the process's id as its /health reports it (server/middleware.py)
    restarts: int = 0  # restarts seen: what a policy learned about the instance before one is void
    seen_up: bool = False  # it answered healthy once

    @property
    def available(self) -> bool:
        return self.healthy and not self.draining

    def load(self) -> float:
        """Requests queued or running there: the router's own count, or the gauges when they say more (other
        clients, or requests the router has not seen finish)."""
        return max(float(self.in_flight), self.num_running + self.num_waiting)

    def mark_failed(self, why: str) -> None:
        """It refused or dropped a connection: take it out until a poll says it is back."""
        if self.healthy:
            logger.warning("instance %s unavailable: %s", self.url, why)
        self.healthy = False
        self.failures += 1

    def note_identity(self, start_id: str | None, ok: bool) -> None:
        """A poll's answer: a new start id is a new process; an instance that reports none counts as
        restarted when it is healthy again after failing (it may have been)."""
        if start_id is not None:
            if self.start_id is not None and start_id != self.start_id:
                self._restarted("a new start id")
            self.start_id = start_id
        elif ok and not self.healthy and self.seen_up and self.start_id is None:
            self._restarted("healthy again after failing")
        self.seen_up = self.seen_up or ok

    def _restarted(self, why: str) -> None:
        self.restarts += 1
        logger.info("instance %s restarted (%s)", self.url, why)

    def close_streams(self) -> None:
        for response in list(self.streams):
            asyncio.ensure_future(response.aclose())


def is_gone(e: Exception) -> bool:
    """A refused or dropped connection means the instance is gone; a timeout may only mean it is busy (an
    overloaded instance accepts late), which must not take a whole fleet out at once."""
    return isinstance(e, (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError,
                          httpx.StreamError)) and not isinstance(e, httpx.TimeoutException)


def parse_gauges(text: str) -> dict[str, float]:
    """The three gauges out of Prometheus text (summed over label sets: one per served model)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in GAUGES:
            try:
                out[GAUGES[name]] = out.get(GAUGES[name], 0.0) + float(line.rsplit(" ", 1)[1])
            except ValueError:
                continue
    return out


class HealthMonitor:
    """Polls every instance each `interval` seconds. A refused connection or an error status takes it out at
    once; polls that time out do so after `dead_after` in a row, which also closes its open streams."""

    def __init__(self, instances: list[Instance], client: httpx.AsyncClient, interval: float = 1.0,
                 timeout: float = 5.0, dead_after: int = 3):
        self.instances, self.client = instances, client
        self.interval, self.timeout, self.dead_after = interval, timeout, dead_after
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:  # the app polled everyone once before serving
        while True:
            await asyncio.sleep(self.interval)
            await self.poll_all()

    async def poll_all(self) -> None:
        await asyncio.gather(*(self.poll(i) for i in self.instances))

    async def poll(self, inst: Instance) -> None:
        try:
            r = await self.client.get(inst.url + "/health", timeout=self.timeout)
            status = r.json().get("status") if r.headers.get("content-type", "").startswith("application/json") \
                else None
            if r.status_code == 200:
                m = await self.client.get(inst.url + "/metrics", timeout=self.timeout)
                for key, value in parse_gauges(m.text).items():
                    setattr(inst, key, value)
            ok, draining = r.status_code == 200, status == "shutting_down"
            inst.note_identity(r.headers.get(START_ID_HEADER), ok)
        except (httpx.HTTPError, ValueError) as e:
            ok, draining = False, False
            why = f"{type(e).__name__}: {e}"
            if isinstance(e, httpx.TimeoutException) and inst.failures + 1 < self.dead_after:
                inst.failures += 1  # busy, perhaps: it keeps its requests for now
                return
        else:
            why = f"/health answered {r.status_code} ({status})"
        inst.last_poll = time.monotonic()
        if ok:
            if not inst.healthy:
                logger.info("instance %s is healthy", inst.url)
            inst.healthy, inst.draining, inst.failures = True, False, 0
            return
        inst.draining = draining
        inst.mark_failed(why)
        if inst.failures >= self.dead_after and not draining:  # a draining one finishes what it has
            inst.close_streams()
