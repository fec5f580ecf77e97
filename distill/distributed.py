"""Ranks of a ``torchrun`` (or ``accelerate launch``) run of ``distill convert`` or ``distill eval``,
over ``torch.distributed``.

One process is a world of one, and every method below is then a no-op, so the stages call them
unconditionally. With ``WORLD_SIZE`` > 1 in the environment, :func:`init_comm` joins the process
group (gloo on CPU, NCCL on GPUs) with the run's ``dist_timeout``. Any collective that fails (a
rank died or stopped answering within the timeout) becomes one :class:`RunFailed` line on every
surviving rank, so no rank hangs and the run's checkpoints stay usable for ``--resume`` with any
number of ranks.

How the work is split (see the stages): perplexity and the data-parallel passes shard sequences
``rank::world``; teacher-input transfer gives each rank a contiguous block of layers; student-input
transfer and finetune split each global batch ``rank::world`` and sum the gradients.

With ``fsdp=true`` (:func:`shard_model`) each rank keeps only its 1/world of the teacher's weights
(FSDP2): a whole-model forward gathers each block's weights as it runs, and :func:`gathered` holds
one block's whole weights on every rank for the layer-by-layer stages. Both are collectives, so
every rank then runs the same forwards and enters the same blocks in the same order.
"""
from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from .errors import DistillError, RunFailed

log = logging.getLogger(__name__)

T = TypeVar("T")
LOST = (
    "rank {rank} lost contact with the other ranks ({why}); stopping. The checkpoints in DIR/state are intact: "
    "rerun with --resume, with any number of ranks"
)


@dataclass
class Comm:
    """This process's rank in a world of ``world`` processes (rank 0 writes files and reports)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # where collectives' tensors live (cuda for NCCL)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (RuntimeError, ConnectionError) as err:  # gloo/NCCL raise DistBackendError, a RuntimeError
            raise self.lost(err) from None

    def lost(self, err: BaseException) -> RunFailed:
        """The one line for a collective that failed with ``err``."""
        return RunFailed(LOST.format(rank=self.rank, why=_why(err)))

    def barrier(self) -> None:
        if self.active:
            self._call(dist.barrier)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce ``tensor`` (sum) in place; returns it."""
        if self.active:
            self._call(lambda: dist.all_reduce(tensor))
        return tensor

    def sum(self, *values: float) -> list[float]:
        """Sums over ranks of a few floats (float64, so the order of ranks barely matters)."""
        if not self.active:
            return [float(v) for v in values]
        t = self.sum_(torch.tensor(values, dtype=torch.float64, device=self.device))
        return [float(v) for v in t]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable, built by this program), in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        self._call(lambda: dist.all_gather_object(out, obj))
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """``obj`` of rank ``src`` on every rank."""
        if not self.active:
            return obj
        box = [obj if self.rank == src else None]
        self._call(lambda: dist.broadcast_object_list(box, src=src))
        return box[0]

    def shard(self, n: int) -> slice:
        """This rank's rows of ``n``: ``rank::world``."""
        return slice(self.rank, n, self.world)

    def cat_shards(self, part: torch.Tensor, n: int) -> torch.Tensor:
        """Undo :meth:`shard`: every rank's ``part`` [n_r, ...] back into the full [n, ...] on every
        rank (one all-gather of the parts padded to the same length, on ``part``'s device)."""
        if not self.active:
            return part
        rows = -(-n // self.world)
        padded = part.new_zeros((rows, *part.shape[1:]))
        padded[: len(part)] = part
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        self._call(lambda: dist.all_gather(parts, padded))
        out = part.new_empty((n, *part.shape[1:]))
        for r, p in enumerate(parts):
            out[r::self.world] = p[: len(range(r, n, self.world))]
        return out


def lost_contact(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed because another rank is gone or silent: NCCL
    raises ``DistBackendError``, gloo's transport (inside FSDP's gathers) a plain RuntimeError."""
    return isinstance(err, dist.DistBackendError) or (isinstance(err, RuntimeError) and "/gloo/" in str(err))


def _why(err: BaseException) -> str:
    """The first line of a backend error, without its source location."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    return re.sub(r"\[[^\]]*:\d+\]\s*", "", first)[:160]


def env_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def env_world() -> tuple[int, int]:
    """(rank, world size) that torchrun / accelerate put in the environment; (0, 1) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_rank_zero() -> bool:
    """Whether this process speaks for the run: one process, or rank 0 under torchrun."""
    return env_world()[0] == 0


def init_comm(timeout: float, device: torch.device) -> Comm:
    """Join the process group of this run (no-op for one process); ``device`` is this rank's."""
    rank, world = env_world()
    if world <= 1:
        return Comm()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        except (RuntimeError, ValueError, ConnectionError) as err:
            raise RunFailed(
                f"rank {rank} could not join the other {world - 1} rank(s) ({_why(err)}); "
                "start every rank with the same torchrun command"
            ) from None
    return Comm(dist.get_rank(), dist.get_world_size(), device)


def log_to_files(out: Path, comm: Comm) -> None:
    """With several ranks: each logs to ``out/logs/rank<N>.log``; only rank 0 keeps INFO on the console."""
    if not comm.active:
        return
    folder = Path(out) / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(folder / f"rank{comm.rank}.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter(f"%(asctime)s rank{comm.rank} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    if not comm.main:
        for console in root.handlers:
            if type(console) is logging.StreamHandler:
                console.setLevel(logging.WARNING)
    root.addHandler(handler)


def close_comm() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def torchrun_ranks(timeout: float = 1800.0):
    """The process group for ``distill eval`` under torchrun (gloo: its collectives carry request
    counts and metrics, not weights); yields this rank's :class:`Comm`."""
    comm = init_comm(timeout, torch.device("cpu"))
    try:
        yield comm
    finally:
        close_comm()


def in_turns(comm: Comm, work: Callable[[], T]) -> T:
    """``work()`` on one rank after the other (rank 0 first), e.g. loading a model into CPU memory
    that only one rank at a time can hold whole. A :class:`DistillError` in one rank's turn is
    raised on every rank."""
    out = None
    for turn in range(comm.world):
        failure = None
        if turn == comm.rank:
            try:
                out = work()
            except DistillError as err:
                failure = err
        failure = comm.broadcast(failure, src=turn)
        if failure is not None:
            raise failure
    return out


def shard_mesh(comm: Comm):
    """The one-dimensional device mesh of all ranks that :func:`shard_model` cuts over (every rank
    must make it, together)."""
    from torch.distributed.device_mesh import init_device_mesh

    return comm._call(lambda: init_device_mesh(comm.device.type, (comm.world,)))


def shard_model(model: torch.nn.Module, blocks: list[torch.nn.Module], keep: set[torch.nn.Parameter], mesh) -> None:
    """Shard ``model`` over ``mesh`` with FSDP2 (``fully_shard``, no communication): each of
    ``blocks`` is one unit (its weights gathered together), the rest of the model (embeddings,
    final norm, head) another. Every parameter is cut along dim 0 and moved to the mesh's device,
    so this rank then holds 1/world of them; those in ``keep`` (small, trained) stay whole. Run one
    forward of the whole model on every rank before :func:`gathered`: FSDP sets itself up in it."""
    from torch.distributed.fsdp import fully_shard

    for p in keep:  # FSDP moves what it shards, and the buffers
        p.data = p.data.to(mesh.device_type)
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params=keep)
    fully_shard(model, mesh=mesh, ignored_params=keep)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or the model that a wrapper such as peft's holds) is sharded by FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


@contextmanager
def gathered(module: torch.nn.Module):
    """Inside the block, the FSDP unit ``module`` holds its whole weights on every rank, and its
    forwards gather nothing (so ranks may run different numbers of them). Entering is one
    all-gather, so every rank must enter; nested entries are free. No-op for an unsharded module."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule) or getattr(module, "_distill_gathered", False):
        yield
        return
    module.unshard()
    module.set_reshard_after_forward(False, recurse=False)
    module._distill_gathered = True
    try:
        yield
    finally:
        module._distill_gathered = False
        module.set_reshard_after_forward(True, recurse=False)
        module.reshard()


def full_state_dict(model: torch.nn.Module, comm: Comm) -> dict[str, torch.Tensor] | None:
    """The whole state dict of a sharded ``model``, on the CPU of rank 0 (None on the other
    ranks, and for a model that is not sharded); every rank must call it."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = comm._call(lambda: get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)))
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):  # a tied weight is saved once, as unsharded
        if first.setdefault(id(p), name) != name:
            state.pop(name, None)
    return state if comm.main else None


def split_blocks(costs: list[float], parts: int) -> list[list[int]]:
    """Cut items 0..n−1 with ``costs`` into ``parts`` contiguous blocks whose largest total is as
    small as possible (blocks may be empty when parts > n). Returns the item indices per block."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # best[p][i]: the smallest largest-block cost of the first i items in p blocks; cut[p][i]: last cut.
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for p in range(1, parts + 1):
        for i in range(n + 1):
            for j in range(i + 1):
                value = max(best[p - 1][j], prefix[i] - prefix[j])
                if value < best[p][i]:
                    best[p][i], cut[p][i] = value, j
    blocks, i = [], n
    for p in range(parts, 0, -1):
        j = cut[p][i]
        blocks.append(list(range(j, i)))
        i = j
    return blocks[::-1]
