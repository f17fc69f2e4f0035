"""torchrun support shared by `featcache build` and `maskfer sweep`: ranks, devices, shards, meeting points.

``torchrun --nproc-per-node N [--nnodes M ...] -m featcache build ...`` starts N processes per node with
``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` (and ``LOCAL_WORLD_SIZE``) in their environment; :func:`detect`
reads them. Each rank works on :meth:`Context.shard` of a work list (round-robin: item ``i`` of the list goes
to rank ``i % world``), on its own device (:meth:`Context.device`: ``cuda:LOCAL_RANK`` or the CPU), and
the ranks meet at :meth:`Context.step` points, where every rank learns whether another one failed. The
only thing the ranks share besides the process group is the store's (or sweep's) directory: nothing here
assumes a common /tmp.

A meeting point is an ``all_gather_object`` of each rank's outcome (over a ``gloo`` group, also when the ranks'
default group is ``nccl``), so a rank that fails with an error tells the others at the next one, and they stop
with a line naming it instead of waiting. A rank that dies without a word (kill -9, out of memory, a lost node)
is noticed by torchrun on its own node (which then stops the node's other ranks), by gloo when its connection
closes, and otherwise by the process group's timeout: ``FEATCACHE_DIST_TIMEOUT`` seconds (default 1800), after
which the waiting ranks stop with a line saying so. A rank that is merely slower is waited for up to the same
time, so a sweep whose ranks finish hours apart needs a larger value.
"""
from __future__ import annotations

import gc
import os
import re
import signal
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from featcache.devices import resolve_device
from featcache.errors import FerError

TIMEOUT_ENV = "FEATCACHE_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 1800.0


class DistributedError(FerError):
    """A torchrun launch that cannot go on: a bad environment, another rank failed, ranks disagree or time out."""


def _env_int(environ, name: str, default: int | None = None) -> int:
    raw = environ.get(name)
    if raw is None:
        if default is None:
            raise DistributedError(f"WORLD_SIZE is set but {name} is not: start the ranks with torchrun "
                                   f"(it sets WORLD_SIZE, RANK, LOCAL_RANK and LOCAL_WORLD_SIZE)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} is not an integer") from None


@dataclass(frozen=True)
class Context:
    """Where this process stands in a torchrun launch; ``world == 1``: a plain single process."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    timeout: float = DEFAULT_TIMEOUT

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def primary(self) -> bool:
        """The rank that takes the store lock, commits, writes summaries and prints results."""
        return self.rank == 0

    @property
    def prefix(self) -> str:
        return f"[rank {self.rank}/{self.world}] " if self.active else ""

    def prefixed(self, log):
        """``log`` with every line prefixed ``[rank R/W] `` (unchanged in a single process)."""
        if not self.active:
            return log
        return lambda msg, *a, **kw: log(self.prefix + str(msg), *a, **kw)

    @property
    def journal_part(self) -> str | None:
        """The journal sub-folder this rank writes its shards into (featcache.journal.Journal's ``part``)."""
        return f"rank-{self.rank:05d}" if self.active else None

    def progress(self, enabled: bool) -> bool:
        """Progress bars on local rank 0 only: one bar per node, not N bars overwriting each other."""
        return enabled and self.local_rank == 0

    def shard(self, work):
        """This rank's part of ``work`` (a sequence or array): items ``rank, rank + world, ...``. Disjoint,
        their union is ``work``, sizes differ by at most one, and it depends only on ``work``, so a rerun that
        computes the same remaining work gives every rank the same part."""
        return work[self.rank::self.world]

    def device(self, requested: str = "auto") -> torch.device:
        """The device of this rank: ``auto`` / ``cuda`` -> ``cuda:LOCAL_RANK`` (``auto``: when CUDA is there),
        ``cpu`` -> the CPU. ``cuda:N`` would put every rank of a node on one GPU, so it is refused."""
        if not self.active:
            return resolve_device(requested)
        if requested.startswith("cuda:"):
            raise DistributedError(
                f"--device {requested}: under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda or auto "
                "(choose the GPUs with CUDA_VISIBLE_DEVICES)")
        dev = resolve_device(requested)
        if dev.type != "cuda":
            return dev
        count = torch.cuda.device_count()
        if self.local_rank >= count:
            raise DistributedError(f"{self.prefix}LOCAL_RANK {self.local_rank} but this node has {count} CUDA "
                                   f"device(s): --nproc-per-node must be at most the number of GPUs")
        return torch.device("cuda", self.local_rank)

    # ------------------------------------------------------------------ meeting points
    def _gather(self, what: str, payload):
        out = [None] * self.world
        try:
            dist.all_gather_object(out, payload, group=_control_group)
        except (RuntimeError, ValueError) as e:  # DistBackendError (a RuntimeError): a timeout or a dead peer
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            first = re.sub(r"^\[[^\]]*\]\s*", "", first)  # gloo starts with its source file:line
            raise DistributedError(
                f"{self.prefix}the other ranks did not reach '{what}' within {self.timeout:.0f} s, or one of them "
                f"died ({first[:200]}); see the other ranks' lines above. Everything finished is kept: run the same "
                f"command again to resume (set {TIMEOUT_ENV}=SECONDS when ranks legitimately wait longer)") from None
        return out

    @contextmanager
    def step(self, what: str, log=None):
        """Every rank runs the block, then all meet. Yields a :class:`Meeting`: set ``.value`` in the block,
        read every rank's ``.values`` after it. ``log`` (a :meth:`prefixed` one) gets this rank's failure. A rank whose block raised tells the others and re-raises its
        error; the others raise :class:`DistributedError` naming it, so no rank waits for one that gave up."""
        meeting = Meeting()
        if not self.active:
            yield meeting
            meeting.values = [meeting.value]
            return
        try:
            yield meeting
        except KeyboardInterrupt:  # torchrun stops every rank (SIGINT/SIGTERM): nobody is left to tell
            raise
        except BaseException as e:
            reason = str(e) or type(e).__name__
            if log is not None:  # the caller's log, prefixed with the rank (prefixed())
                log(f"failed while {what}: {reason}")
            try:
                self._gather(what, (reason, None))
            except DistributedError:
                pass  # the others are gone too; this rank's own error is the one to report
            raise
        results = self._gather(what, (None, meeting.value))
        failed = [(r, err) for r, (err, _) in enumerate(results) if err is not None]
        if failed:
            first_rank, first_err = failed[0]
            more = f" (and rank(s) {', '.join(str(r) for r, _ in failed[1:])})" if len(failed) > 1 else ""
            raise DistributedError(f"{self.prefix}stopping: rank {first_rank}/{self.world}{more} failed while {what}: "
                                   f"{first_err}")
        meeting.values = [v for _, v in results]

    def agree(self, what: str, values: list, hint: str) -> None:
        """Every rank's value (one :meth:`step`'s ``values``) must equal rank 0's: each rank must list the same
        data, read the same store and the same journal, or they would encode or train different things."""
        odd = [r for r, v in enumerate(values) if v != values[0]]
        if odd:
            raise DistributedError(f"{self.prefix}rank(s) {', '.join(map(str, odd))} of {self.world} see {what} unlike "
                                   f"rank 0's: {hint}")


@dataclass
class Meeting:
    value: object = None
    values: list = field(default_factory=list)


SINGLE = Context()

# The meeting points' group: gloo even when the ranks' default group is nccl (CUDA), so that a timeout or a dead
# peer ends a meeting with the same DistributedError on GPUs as on CPUs, and no object goes through GPU memory.
# None: the default group (gloo already) or a group the caller initialised.
_control_group = None


def detect(environ=None) -> Context:
    """The torchrun context from ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``; a single process
    when ``WORLD_SIZE`` is absent or 1."""
    environ = os.environ if environ is None else environ
    world = _env_int(environ, "WORLD_SIZE", 1)
    if world <= 1:
        return SINGLE
    rank = _env_int(environ, "RANK")
    local_rank = _env_int(environ, "LOCAL_RANK")
    local_world = _env_int(environ, "LOCAL_WORLD_SIZE", world)
    if not 0 <= rank < world or not 0 <= local_rank < local_world:
        raise DistributedError(f"RANK={rank} / LOCAL_RANK={local_rank} out of range for WORLD_SIZE={world}, "
                               f"LOCAL_WORLD_SIZE={local_world}")
    raw = environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT))
    try:
        timeout = float(raw)
        if not timeout > 0:
            raise ValueError
    except ValueError:
        raise DistributedError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds > 0") from None
    return Context(rank, world, local_rank, local_world, timeout)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _on_sigterm(handler):
    """Install a SIGTERM handler; None (and nothing changed) outside the main thread, where Python allows none."""
    if handler is None:
        return None
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


@contextmanager
def session(ctx: Context, device: torch.device):
    """The process group of a torchrun launch for the block: ``nccl`` on CUDA, ``gloo`` on the CPU, with the
    context's timeout (the meeting points use a ``gloo`` group in both cases); torn down at the end. Nothing in a
    single process, and a group the caller already initialised is used as it is (and left alone). SIGTERM, which torchrun sends to stop the ranks, raises
    KeyboardInterrupt meanwhile, so a rank being stopped still writes the results it holds in memory."""
    if not ctx.active or dist.is_initialized():
        yield ctx
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    previous = _on_sigterm(_raise_interrupt)
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=ctx.timeout), rank=ctx.rank,
                                world_size=ctx.world)
    except (RuntimeError, ValueError) as e:
        _on_sigterm(previous)
        raise DistributedError(f"{ctx.prefix}cannot join the other ranks ({backend}, timeout {ctx.timeout:.0f} s): "
                               f"{(str(e).strip().splitlines() or [''])[0][:300]}") from None
    global _control_group
    try:
        if backend != "gloo":
            _control_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=ctx.timeout))
        yield ctx
    finally:
        _on_sigterm(previous)
        _control_group = None
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a group broken by a dead peer cannot always be torn down cleanly
            pass
        # Free what still refers to the group now, not in interpreter finalization: a gloo group torn down there
        # aborted a rank now and then in the tests ("terminate called without an active exception", exit -6)
        # after all its work was done; not seen since this collect.
        gc.collect()
