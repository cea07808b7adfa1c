"""A same-host shared-memory all-reduce for CPU tensor parallelism (the TP group's ranks on one machine).

gloo over loopback costs tens of microseconds per collective, a large share of a batch-1 decode step that does
two per layer on a [rows, hidden] tensor. Here the ranks of a TP group map one file in /dev/shm instead:

    header: per rank one 64-byte line [sequence number, pid]; then two buffers of `size` slots of `slot_bytes`

All-reduce number s: each rank copies its tensor into its slot of buffer s % 2, then stores s as its sequence
number (x86 keeps stores in order, so a peer that sees s sees the data); it waits until every rank's number is
>= s, and sums the slots in rank order 0, 1, ... into its tensor, so every rank gets bitwise the same result
(for 2 ranks also gloo's: a + b == b + a in floating point). Two buffers make the slots safe to reuse: a rank
writes buffer s % 2 again only at s + 2, after every rank posted s + 1, i.e. finished reading s. The ordering
argument needs x86's stores to stay in program order, so other CPUs keep gloo.

The waiting rank calls os.sched_yield() between checks, so ranks that share one core still make progress. A
peer that stops answering raises `ShmTimeout` after the collective timeout (FRONTIERLM_DIST_TIMEOUT_S), at once
if its process is gone. The file is created by the group's first rank under a random name, opened by the others,
and unlinked as soon as every rank has mapped it (the mappings outlive the name): nothing is left in /dev/shm,
even when a rank is killed later. A group whose ranks cannot all open it (other hosts) keeps gloo.
"""
from __future__ import annotations

import mmap
import os
import platform
import secrets
import time

import numpy as np
import torch
import torch.distributed as dist

from frontierlm.distributed.state import positive_env

SHM_DIR = "/dev/shm"
LINE = 64  # bytes: one cache line per rank's counter, so ranks do not write the same line
DEFAULT_SLOT_MB = 4.0  # per rank and buffer: the prefill activations of a 512-wide model up to 2048 tokens (fp32)
NAME_LEN = 64


class ShmTimeout(RuntimeError):
    """A peer of the shared-memory all-reduce died or hangs."""


def enabled() -> bool:
    """FRONTIERLM_SHM_ALLREDUCE=0 turns the shared-memory all-reduce off (gloo for every collective)."""
    return os.environ.get("FRONTIERLM_SHM_ALLREDUCE", "1").strip().lower() not in ("0", "false", "off", "no")


def slot_bytes() -> int:
    """FRONTIERLM_SHM_ALLREDUCE_MB: the largest tensor (MiB) it carries; larger ones go through gloo."""
    mb = positive_env("FRONTIERLM_SHM_ALLREDUCE_MB", DEFAULT_SLOT_MB, "MiB")
    return -(-int(mb * 2**20) // LINE) * LINE


def _alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class ShmAllReduce:
    """One rank's end of a group's shared buffer. `all_reduce(x)` sums x over the group in place."""

    def __init__(self, fd: int, rank: int, size: int, slot: int, timeout_s: float):
        self.rank, self.size, self.slot, self.timeout_s = rank, size, slot, timeout_s
        self.header_bytes = size * LINE
        total = self.header_bytes + 2 * size * slot
        self.map = mmap.mmap(fd, total)
        self.lines = np.frombuffer(self.map, dtype=np.int64, count=size * LINE // 8).reshape(size, LINE // 8)
        self.bytes = torch.frombuffer(self.map, dtype=torch.uint8)
        self.seq = 0
        self.peers = [r for r in range(size) if r != rank]
        self.peer_pids: dict[int, int] = {}
        self._views: dict = {}
        self.closed = False
        self.lines[rank, 1] = os.getpid()

    # ---- set-up --------------------------------------------------------------------------------------
    @classmethod
    def create(cls, rank: int, size: int, slot: int, timeout_s: float) -> tuple["ShmAllReduce", str]:
        """The group's first rank: a new file under a random name (O_EXCL: never an existing file)."""
        name = f"frontierlm-tp-{os.getpid()}-{secrets.token_hex(8)}"
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, size * LINE + 2 * size * slot)
            return cls(fd, rank, size, slot, timeout_s), path
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)

    @classmethod
    def attach(cls, path: str, rank: int, size: int, slot: int, timeout_s: float) -> "ShmAllReduce":
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        try:
            if os.fstat(fd).st_size != size * LINE + 2 * size * slot:
                raise OSError(f"{path} is not this group's buffer (size {os.fstat(fd).st_size})")
            return cls(fd, rank, size, slot, timeout_s)
        finally:
            os.close(fd)

    def note_peers(self) -> None:
        """After every rank attached (each wrote its pid first): watch the peers' processes while waiting, if
        this process can see them (same pid namespace)."""
        pids = {r: int(self.lines[r, 1]) for r in self.peers}
        self.peer_pids = pids if all(p > 0 and _alive(p) for p in pids.values()) else {}

    def close(self) -> None:
        self.closed = True  # TPAllReduce goes to the backend from now on (which fails once the group is gone)
        self._views.clear()
        self.lines = self.bytes = None
        try:
            self.map.close()
        except BufferError:  # a view is still referenced somewhere: the mapping goes with the process
            pass

    # ---- the collective ------------------------------------------------------------------------------
    def fits(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.is_contiguous() and x.numel() * x.element_size() <= self.slot

    def _slots(self, buf: int, dtype: torch.dtype, numel: int) -> list[torch.Tensor]:
        key = (buf, dtype, numel)
        views = self._views.get(key)
        if views is None:
            if len(self._views) > 256:  # many shapes (prefill chunks): keep the map small
                self._views.clear()
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            base = self.header_bytes + buf * self.size * self.slot
            with torch.inference_mode(False):  # ordinary views: written in and out of inference mode alike
                views = [self.bytes[base + r * self.slot: base + r * self.slot + nbytes].view(dtype)
                         for r in range(self.size)]
            self._views[key] = views
        return views

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.seq += 1
        s = self.seq
        slots = self._slots(s & 1, x.dtype, x.numel())
        flat = x.view(-1)
        slots[self.rank].copy_(flat)
        self.lines[self.rank, 0] = s  # after the data (program order; x86 stores are not reordered)
        for r in self.peers:
            if self.lines[r, 0] < s:
                self._wait(r, s)
        torch.add(slots[0], slots[1], out=flat)
        for r in range(2, self.size):
            flat.add_(slots[r])
        return x

    def _wait(self, r: int, s: int) -> None:
        lines, spins = self.lines, 0
        deadline = time.monotonic() + self.timeout_s
        pid = self.peer_pids.get(r)
        while lines[r, 0] < s:
            os.sched_yield()  # a peer on the same core gets to run
            spins += 1
            if spins & 1023 == 0:
                if pid is not None and not _alive(pid):
                    raise ShmTimeout(f"shared-memory all-reduce #{s}: TP rank {r} (pid {pid}) is gone")
                if time.monotonic() > deadline:
                    raise ShmTimeout(f"shared-memory all-reduce #{s}: TP rank {r} did not answer within "
                                     f"{self.timeout_s:.0f}s (FRONTIERLM_DIST_TIMEOUT_S): it died or hangs")


def setup(group, group_rank: int, size: int, first_global_rank: int, timeout_s: float) -> ShmAllReduce | None:
    """Every rank of a CPU (gloo) `group` calls this at start-up (three small collectives); all get a
    ShmAllReduce or all get None (turned off on any rank, /dev/shm missing, or a rank cannot open the file)."""
    # x86 only: the order of the data and sequence-number stores rests on x86's store ordering (no fence here)
    want = enabled() and size > 1 and os.path.isdir(SHM_DIR) and platform.machine().lower() in ("x86_64", "amd64")
    flag = torch.tensor([int(want)], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    if not flag.item():
        return None
    slot = slot_bytes()
    comm, path = None, None
    name = torch.zeros(NAME_LEN, dtype=torch.uint8)
    try:
        if group_rank == 0:
            try:
                comm, path = ShmAllReduce.create(group_rank, size, slot, timeout_s)
                name[:len(path)] = torch.tensor(list(path.encode()), dtype=torch.uint8)
            except (OSError, ValueError):
                comm = None
        dist.broadcast(name, src=first_global_rank, group=group)
        if group_rank != 0:
            text = bytes(name.tolist()).rstrip(b"\0").decode()
            try:
                comm = ShmAllReduce.attach(text, group_rank, size, slot, timeout_s) if text else None
            except (OSError, ValueError):
                comm = None
        ok = torch.tensor([int(comm is not None)], dtype=torch.int64)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)  # every rank has mapped it (and written its pid)
    except BaseException:
        if comm is not None:
            comm.close()
        raise
    finally:
        if path is not None:  # the mappings stay; the name goes now, whatever happens later
            os.unlink(path)
    if not ok.item():
        if comm is not None:
            comm.close()
        return None
    comm.note_peers()
    return comm


class TPAllReduce:
    """The TP group's sum, as the layers call it: shared memory when the tensor fits, gloo / NCCL otherwise."""

    def __init__(self, group=None, shm: ShmAllReduce | None = None):
        self.group, self.shm = group, shm

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._fast(x):
            return self.shm.all_reduce(x)
        dist.all_reduce(x, group=self.group)
        return x

    def _fast(self, x: torch.Tensor) -> bool:
        return self.shm is not None and not self.shm.closed and self.shm.fits(x)

    def broadcast(self, x: torch.Tensor, root: bool) -> torch.Tensor:
        """Group rank 0's `x` into every rank's `x`: on shared memory a sum to which the others add zeros (exact:
        v + 0 == v; only a negative zero comes back positive), else dist.broadcast. Every rank decides the same
        way, since the tensor's shape and dtype are the same on all of them."""
        if not self._fast(x):
            dist.broadcast(x, dist.get_global_rank(self.group, 0), group=self.group)
            return x
        if not root:
            x.zero_()
        return self.shm.all_reduce(x)

    def gather(self, x: torch.Tensor, rank: int, size: int) -> list[torch.Tensor] | None:
        """Every rank's `x` on group rank 0 (None elsewhere): on shared memory each rank sums its part into its own
        row of a zero [size, ...] tensor, else dist.gather."""
        rows = torch.zeros((size,) + tuple(x.shape), dtype=x.dtype, device=x.device)
        if not self._fast(rows):
            parts = [torch.empty_like(x) for _ in range(size)] if rank == 0 else None
            dist.gather(x.contiguous(), parts, group=self.group, group_dst=0)
            return parts
        rows[rank].copy_(x)
        self.shm.all_reduce(rows)
        return list(rows.unbind(0)) if rank == 0 else None
