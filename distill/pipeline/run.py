"""``distill convert``: the stages, top to bottom.

    load teacher -> calibration data -> swap attention -> teacher perplexity
    -> fit (stage 1) -> transfer (stage 2) -> finetune (stage 3, optional)
    -> student perplexity -> save the converted model -> report

Every step that takes time records an entry in ``DIR/state`` (see :mod:`.checkpoint`); each
stage checkpoints itself through its :class:`.train.StageContext`, and a resumed run skips the
recorded steps, so the same seed ends at the same result. A student whose held-out perplexity
is not finite is never saved: the run fails (exit 1) naming the last stage that trained it.

Under ``torchrun`` every rank runs this same function (see :mod:`.distributed`): rank 0 prepares
the data and writes the run folder, the model and the report; the stages split their work over
the ranks; each rank logs to ``DIR/logs/rank<N>.log``. With ``fsdp=true`` the ranks load and
convert the model in turns and each keeps its shard of the teacher's weights (FSDP2); rank 0
gathers the whole weights once, to save them.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import distill_kernels as ops

from ..convert import check_convertible, convert_model, set_sparse_cache
from ..errors import DistillError, RunFailed
from ..files import atomic_write_text, disk_full_is_user_error, sha256
from ..models import load_model
from .checkpoint import RunStore, diff_keys, check_run_dir, open_run_dir
from .data import TokenData, prepare_data
from ..distributed import (
    Comm, close_comm, env_local_rank, full_state_dict, in_turns, init_comm, log_to_files, lost_contact, shard_mesh, shard_model,
)
from .finetune import check_targets, run_finetune
from .fit import run_fit
from .layerwise import decoder_layers
from .params import SHARED, converted_layers
from .perplexity import perplexity
from .report import merge_layers, write_report
from .run_config import RunConfig, dump_run_config
from .select import run_select
from .train import StageContext, prepare_new_parameters
from .transfer import run_transfer

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """The run's device; ``auto`` and plain ``cuda`` mean this rank's GPU (LOCAL_RANK) under torchrun."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DistillError(f"device {name!r} is not a torch device; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DistillError("device=cuda but no GPU is visible; use device=cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", env_local_rank())
        torch.cuda.set_device(device)
    try:  # DISTILL_BACKEND must be able to run here: say so now, not at the first forward
        ops.resolve_backend(device)
    except ValueError as err:
        raise DistillError(str(err)) from None
    return device


def busy_cores(seconds: float = 0.3) -> float:
    """Cores that other processes keep busy now: the machine's CPU time over ``seconds`` while this
    process sleeps (Linux /proc/stat), else the 1-minute load average."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return sum(ticks), ticks[3] + ticks[4]

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(1, total1 - total0))


def set_threads(requested: int) -> int:
    """Apply ``threads`` (0 = auto, see :class:`RunConfig`); returns the number used."""
    threads = requested
    if not threads:
        threads = torch.get_num_threads()
        if (os.cpu_count() or 1) <= 4 and busy_cores() >= 0.5:
            # Other work on a small machine: torch's threads then wait on each other at every op,
            # measured up to 18x slower than one thread. On idle cores they pay (2 threads: a
            # transfer step 1.6x faster on 2 cores at 1 x 2048 and 2 x 1024 tokens).
            threads = 1
    torch.set_num_threads(threads)
    return threads


class Timer:
    """Seconds per stage; the part spent before a resume comes from the checkpoint metadata."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


def _stage_data(cfg: RunConfig, model, tokenizer, store: RunStore, timer: Timer, comm: Comm) -> TokenData:
    if store.has("data"):
        tensors, meta = store.load("data")
        timer.add("data", meta["seconds"])
        return TokenData(train=tensors["train"], heldout=tensors["heldout"])
    start = time.time()
    data = prepare_data(cfg, model, tokenizer, comm)
    seconds = time.time() - start
    store.save("data", {"train": data.train, "heldout": data.heldout}, {"seconds": seconds})
    timer.add("data", seconds)
    log.info("data: %d calibration and %d held-out sequences of %d tokens", len(data.train), len(data.heldout), cfg.seq_len)
    return data


def _stage_value(key: str, store: RunStore, timer: Timer, compute) -> dict[str, Any]:
    """A step whose result is a small dict (a perplexity): computed once, then recorded."""
    if store.has(key):
        meta = store.meta(key)
    else:
        start = time.time()
        meta = compute()
        meta["seconds"] = time.time() - start
        store.save(key, None, meta)
    timer.add(key, meta["seconds"])
    return meta


def _save_model(model, tokenizer, out: Path, store: RunStore, state: dict | None = None) -> None:
    """save_pretrained into a temporary folder, then rename each file into ``out``; ``state``: the
    whole weights of a sharded model."""
    with tempfile.TemporaryDirectory(dir=out, prefix=".save-") as tmp:
        with disk_full_is_user_error(out):
            model.save_pretrained(tmp, tokenizer=tokenizer, **({"state_dict": state} if state is not None else {}))
        files = {}
        for path in sorted(Path(tmp).iterdir()):
            if path.is_file():
                files[path.name] = {"size": path.stat().st_size, "sha256": sha256(path)}
                os.replace(path, out / path.name)
            else:
                shutil.rmtree(out / path.name, ignore_errors=True)
                os.replace(path, out / path.name)
    store.save("model", None, {"files": files})


def _stage_failed(stage: str, ppl: float) -> RunFailed:
    hints = {"fit": "check the feature map and fit settings", "transfer": "lower transfer.lr", "finetune": "lower finetune.lr"}
    return RunFailed(
        f"the student's held-out perplexity is {ppl} after the {stage} stage, so no model was saved; "
        f"{hints.get(stage, 'check the config')} and start again with --overwrite (the checkpoints in DIR/state are intact)"
    )


def run_header(spec: str, cfg: RunConfig) -> dict[str, Any]:
    """What a resumed run must share with the run it continues (not ``dist_timeout`` or ``fsdp``,
    which may change: they change how the ranks share the work, not the student)."""
    config = cfg.to_dict()
    config.pop("dist_timeout")
    config.pop("fsdp")
    return {"model": spec, "config": config}


def upgrade_header(old: dict[str, Any]) -> dict[str, Any]:
    """The header of a run written by an earlier distill, with the settings added since at their
    defaults (a new setting defaults to the behaviour from before it existed). A setting that no
    longer exists stays, for the comparison to name."""

    def fill(have: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
        out = dict(have)
        for key, value in defaults.items():
            if key not in out:
                out[key] = value
            elif isinstance(value, dict) and isinstance(out[key], dict):
                out[key] = fill(out[key], value)
        return out

    defaults = RunConfig().to_dict()
    defaults.pop("dist_timeout")
    defaults.pop("fsdp")
    return {**old, "config": fill(old.get("config") or {}, defaults)}


def check_same_ranks(comm: Comm, launch: dict[str, Any]) -> None:
    """Refuse, on every rank and before any work, ranks started with different commands."""
    launches = comm.gather(launch)
    for rank, other in enumerate(launches):
        diff = diff_keys(launches[0], other)
        if diff:
            raise DistillError(
                f"rank {rank} was started with a different {diff[0]} than rank 0; start every rank with the same command"
            )


def run_convert(spec: str, out: str | Path, cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Run ``distill convert`` and return the report (also written to ``out``)."""
    device = resolve_device(cfg.device)
    comm = init_comm(cfg.dist_timeout, device)
    try:
        return _run_convert(spec, Path(out).expanduser(), cfg, resume, overwrite, device, comm)
    except RuntimeError as err:  # a collective inside a forward or a gather (fsdp=true)
        if comm.active and lost_contact(err):
            raise comm.lost(err) from None
        raise
    finally:
        close_comm()


def _run_convert(spec: str, out: Path, cfg: RunConfig, resume: bool, overwrite: bool, device, comm: Comm) -> dict:
    began = time.time()
    header = run_header(spec, cfg)
    check_same_ranks(comm, {**header, "out": str(out.resolve()), "resume": resume, "overwrite": overwrite, "fsdp": cfg.fsdp})
    sharded = cfg.fsdp and comm.active
    if sharded and cfg.data == "self":
        raise DistillError(
            "data=self samples text from the whole teacher on one rank, which fsdp=true does not hold; "
            "give data a text file, folder or dataset, or set fsdp=false"
        )
    check_run_dir(out, header, resume, overwrite, upgrade_header)  # fail fast, before the slow model load
    comm.barrier()  # every rank has looked at DIR before rank 0 may create or replace it
    threads = set_threads((RunStore(out).open().get("threads") if resume else None) or cfg.threads)

    start = time.time()
    if sharded:  # the ranks take turns to hold the whole teacher in CPU memory, convert it and keep their shard
        mesh = shard_mesh(comm)
        model, tokenizer = in_turns(comm, lambda: _load_shard(spec, cfg, mesh))
    else:
        model, tokenizer = _load_teacher(spec, cfg)
        model.to(device)
    loaded = time.time() - start

    # Only now is DIR created (or replaced): a bad MODEL leaves it as it was. Rank 0 writes it.
    if comm.main:
        store = open_run_dir(out, header, resume, overwrite, upgrade_header)
        atomic_write_text(out / "run.yaml", f"# distill convert {spec} --out {out} --resume\n" + dump_run_config(cfg))
        store.set_header("threads", threads)  # a resumed run keeps it: float sums depend on it
    comm.barrier()
    if not comm.main:
        store = RunStore.follower(out)
    log_to_files(out, comm)
    log.info("using %d CPU thread(s)%s", threads, f"; rank {comm.rank} of {comm.world}" if comm.active else "")
    timer = Timer()
    timer.add("load", loaded)
    torch.manual_seed(cfg.seed)
    progress = tqdm if comm.main else partial(tqdm, disable=True)
    ctx = StageContext(seed=cfg.seed, store=store, progress=progress, device=device, dtype=getattr(torch, cfg.dtype), comm=comm)

    data = _stage_data(cfg, model, tokenizer, store, timer, comm)  # data=self samples from the teacher: before the swap
    if sharded:
        with torch.no_grad():  # FSDP sets itself up in a first forward of the whole model
            model(input_ids=data.heldout[:1, :2].to(device), distill_mode="teacher", use_cache=False)
        model.reshard()  # FSDP keeps the outermost unit (embeddings, head) gathered after a forward
        log.info("fsdp: this rank holds %.3f GiB of the model's weights", _local_bytes(model) / 2**30)
    else:
        _swap(model, cfg)

    batch = cfg.batch_size_eval
    teacher = _stage_value(
        "teacher_eval", store, timer, lambda: {"ppl": perplexity(model, data.heldout, "teacher", batch, progress, "teacher ppl", comm)}
    )
    log.info("teacher held-out perplexity: %.3f", teacher["ppl"])

    last_stage = "conversion"
    fit_layers = None
    if cfg.fit.enabled:
        fit_layers = run_fit(model, data, cfg.fit, ctx)
        timer.add("fit", store.meta("fit")["seconds"])
        last_stage = "fit"

    transfer_layers = None
    if cfg.transfer.enabled:
        # Wall time of this call (it includes moving activations between layers) plus the time
        # that layers finished before a --resume recorded.
        restored = sum(store.meta(k)["seconds"] for k in list(store.entries) if k.startswith("transfer/"))
        start = time.time()
        transfer_layers = run_transfer(model, data, cfg.transfer, ctx)
        timer.add("transfer", time.time() - start + restored)
        last_stage = "transfer"

    selected = None
    if cfg.select.keep_softmax:
        selected = run_select(model, data, cfg.select, ctx)
        timer.add("select", selected.seconds)

    finetuned = None
    if cfg.finetune.enabled and cfg.finetune.steps:
        finetuned = run_finetune(model, data, cfg.finetune, ctx, batch)
        timer.add("finetune", finetuned.seconds)
        last_stage = "finetune"

    if cfg.model.sparse_cache:
        set_sparse_cache(model, cfg.model.sparse_cache)
    student = _stage_value(
        "student_eval", store, timer, lambda: {"ppl": perplexity(model, data.heldout, "parallel", batch, progress, "student ppl", comm)}
    )
    if not math.isfinite(student["ppl"]):
        store.drop(["student_eval"])  # a resumed run measures again rather than trusting this
        raise _stage_failed(last_stage, student["ppl"])
    log.info("student held-out perplexity: %.3f (teacher %.3f)", student["ppl"], teacher["ppl"])

    start = time.time()
    state = full_state_dict(model, comm)
    if comm.main:
        _save_model(model, tokenizer, out, store, state)
    del state
    timer.add("save", time.time() - start)

    converted = converted_layers(model)
    tokens_by_stage = {
        "fit": store.meta("fit")["tokens"] if fit_layers is not None else 0,
        "transfer": sum(r.tokens for r in transfer_layers or []),
        "finetune": finetuned.tokens if finetuned else 0,
    }
    seconds = dict(timer.seconds)
    seconds["total"] = sum(seconds.values())  # all stages, including runs before a --resume
    seconds["this_run"] = time.time() - began
    events = [e for r in transfer_layers or [] for e in r.events] + (finetuned.events if finetuned else [])
    report = {
        "model": spec,
        "teacher_ppl": teacher["ppl"],
        "student_ppl": student["ppl"],
        "ppl_ratio": student["ppl"] / teacher["ppl"],
        "tokens": int(data.train.numel()),
        "heldout_tokens": int(data.heldout.numel()),
        "tokens_by_stage": tokens_by_stage,
        "seconds": seconds,
        "layers": merge_layers(converted, fit_layers, transfer_layers),
        "events": events,
        "finetune_ppl_curve": finetuned.ppl_curve if finetuned else [],
        "select": asdict(selected) if selected else None,
        "teacher_mode": TEACHER_MODE_AFTER_FINETUNE
        if finetuned and set(cfg.finetune.targets) & set(SHARED)
        else "the teacher's own attention",
        "config": cfg.to_dict(),
    }
    if comm.active:
        report["ranks"] = comm.world
    if sharded:
        model.reshard()
        report["weights_gib_per_rank"] = comm.gather(_local_bytes(model) / 2**30)
    if device.type == "cuda":  # per rank, for sizing a GPU run
        report["peak_gpu_gib"] = comm.gather(torch.cuda.max_memory_allocated(device) / 2**30)
    curves = {f"layer {r.layer}": r.curve for r in transfer_layers or []}
    if finetuned:
        curves["finetune"] = finetuned.curve
    if comm.main:
        write_report(report, curves, out)
    comm.barrier()  # no rank exits before the model and the report are written
    return report


def _load_teacher(spec: str, cfg: RunConfig):
    """(model, tokenizer) on the CPU, checked before any slow work."""
    model, tokenizer = load_model(spec, getattr(torch, cfg.dtype))
    check_convertible(model, cfg.model)
    if cfg.finetune.enabled and cfg.finetune.steps:
        check_targets(model, cfg.finetune.targets)
    return model, tokenizer


def _swap(model, cfg: RunConfig) -> None:
    """Replace the attention (in place); the new parameters train in fp32, the teacher's are frozen."""
    convert_model(model, cfg.model)
    set_sparse_cache(model, 0)  # training-free: the stages train the plain hybrid; switched on before the student's eval
    prepare_new_parameters(model)


def _load_shard(spec: str, cfg: RunConfig, mesh):
    """fsdp=true: load and convert the model, then keep this rank's shard of the teacher's weights
    (one FSDP unit per decoder layer); the parameters conversion added stay whole on every rank."""
    model, tokenizer = _load_teacher(spec, cfg)
    _swap(model, cfg)
    shard_model(model, list(decoder_layers(model)), {p for p in model.parameters() if p.requires_grad}, mesh)
    return model, tokenizer


def _local_bytes(model) -> int:
    """Bytes of the weights this rank holds (its shards of the sharded ones)."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).nbytes for p in model.parameters())


TEACHER_MODE_AFTER_FINETUNE = (
    "the teacher's attention over the finetuned q/k/v/o projections (LoRA is merged into the weights the "
    "student shares with its teacher mode): compare against the original MODEL, not this mode"
)
