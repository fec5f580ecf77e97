"""``distill convert``: the stages, top to bottom.

    load teacher -> calibration data -> swap attention -> teacher perplexity
    -> fit (stage 1) -> transfer (stage 2) -> finetune (stage 3, optional)
    -> student perplexity -> save the converted model -> report

Every step that takes time records an entry in ``DIR/state`` (see :mod:`.checkpoint`); a
resumed run skips the recorded steps, so the same seed ends at the same result.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..architectures import PREFIX, get_architecture
from ..convert import convert_model
from ..errors import DistillError
from ..feature_maps import build_feature_map
from ..models import load_model
from .checkpoint import RunStore, atomic_write_text, check_run_dir, open_run_dir, sha256
from .config import RunConfig, dump_run_config
from .data import TokenData, prepare_data
from .evaluate import perplexity
from .finetune import run_finetune
from .fit import run_fit
from .params import converted_layers, load_state, model_state, new_parameters
from .report import merge_layers, write_report
from .stream import decoder_layers
from .transfer import run_transfer

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DistillError(f"device {name!r} is not a torch device; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DistillError("device=cuda but no GPU is visible; use device=cpu")
    return device


def check_conversion(model, cfg: RunConfig) -> None:
    """Fail before any slow work if the model or the student config cannot be converted."""
    config = model.config
    if getattr(config, "model_type", "").startswith(PREFIX):
        raise DistillError("MODEL is already a converted model; convert its teacher instead")
    get_architecture(getattr(config, "model_type", ""))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    build_feature_map(cfg.model.feature_map, cfg.model.feature_map_kwargs, head_dim, config.num_attention_heads, config.num_key_value_heads)
    bad = [i for i in cfg.model.keep_softmax_layers if not 0 <= i < config.num_hidden_layers]
    if bad:
        raise DistillError(f"model.keep_softmax_layers has index {bad[0]}; the model has {config.num_hidden_layers} layers")


def set_threads(requested: int) -> int:
    """Apply ``threads`` (0 = auto, see :class:`RunConfig`); returns the number used."""
    threads = requested
    if not threads:
        threads = torch.get_num_threads()
        cores = os.cpu_count() or 1
        busy = hasattr(os, "getloadavg") and os.getloadavg()[0] >= 0.75
        if cores <= 2 or (busy and cores <= 4):
            # Small ops dominate transfer; with few cores (and any other job running) torch's
            # threads mostly wait on each other, measured up to 18x slower than one thread.
            threads = 1
    torch.set_num_threads(threads)
    return threads


class Timer:
    """Seconds per stage; the part spent before a resume comes from the checkpoint metadata."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


def _stage_data(cfg: RunConfig, model, tokenizer, store: RunStore, timer: Timer) -> TokenData:
    if store.has("data"):
        tensors, meta = store.load("data")
        timer.add("data", meta["seconds"])
        return TokenData(train=tensors["train"], heldout=tensors["heldout"])
    start = time.time()
    data = prepare_data(cfg, model, tokenizer)
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


def _stage_fit(model, data: TokenData, cfg: RunConfig, store: RunStore, timer: Timer) -> list[dict] | None:
    if not cfg.fit.enabled:
        return None
    if store.has("fit"):
        tensors, meta = store.load("fit")
        load_state(model, tensors)
    else:
        start = time.time()
        layers = run_fit(model, data.train, cfg.fit, tqdm)
        meta = {"layers": layers, "seconds": time.time() - start, "tokens": min(cfg.fit.sequences, len(data.train)) * cfg.seq_len}
        store.save("fit", model_state(model), meta)
    timer.add("fit", meta["seconds"])
    return meta["layers"]


def _save_model(model, tokenizer, out: Path, store: RunStore) -> None:
    """save_pretrained into a temporary folder, then rename each file into ``out``."""
    with tempfile.TemporaryDirectory(dir=out, prefix=".save-") as tmp:
        model.save_pretrained(tmp, tokenizer=tokenizer)
        files = {}
        for path in sorted(Path(tmp).iterdir()):
            if path.is_file():
                files[path.name] = {"size": path.stat().st_size, "sha256": sha256(path)}
                os.replace(path, out / path.name)
            else:
                shutil.rmtree(out / path.name, ignore_errors=True)
                os.replace(path, out / path.name)
    store.save("model", None, {"files": files})


def convert(spec: str, out: str | Path, cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Run ``distill convert`` and return the report (also written to ``out``)."""
    began = time.time()
    out = Path(out).expanduser()
    header = {"model": spec, "config": cfg.to_dict()}
    check_run_dir(out, header, resume, overwrite)  # fail fast, before the slow model load
    device = resolve_device(cfg.device)
    threads = set_threads((RunStore(out).open().get("threads") if resume else None) or cfg.threads)

    start = time.time()
    model, tokenizer = load_model(spec, getattr(torch, cfg.dtype))
    check_conversion(model, cfg)
    model.to(device)
    loaded = time.time() - start

    # Only now is DIR created (or replaced): a bad MODEL leaves it as it was.
    store = open_run_dir(out, header, resume, overwrite)
    atomic_write_text(out / "run.yaml", f"# distill convert {spec} --out {out} --resume\n" + dump_run_config(cfg))
    store.set_header("threads", threads)  # a resumed run keeps it: float sums depend on it
    log.info("using %d CPU thread(s)", threads)
    timer = Timer()
    timer.add("load", loaded)
    torch.manual_seed(cfg.seed)

    data = _stage_data(cfg, model, tokenizer, store, timer)
    convert_model(model, cfg.model)
    model.requires_grad_(False)  # the teacher's weights stay frozen
    for i in converted_layers(model):  # the new parameters train, in fp32
        for p in new_parameters(decoder_layers(model)[i].self_attn).values():
            p.data = p.data.float()
            p.requires_grad_(True)

    batch = cfg.batch_size_eval
    teacher = _stage_value(
        "teacher_eval", store, timer, lambda: {"ppl": perplexity(model, data.heldout, "teacher", batch, tqdm, "teacher ppl")}
    )
    log.info("teacher held-out perplexity: %.3f", teacher["ppl"])

    fit_layers = _stage_fit(model, data, cfg, store, timer)

    transfer_layers = None
    if cfg.transfer.enabled:
        # Wall time of this call (it includes moving activations between layers) plus the time
        # that layers finished before a --resume recorded.
        restored = sum(store.meta(k)["seconds"] for k in list(store.entries) if k.startswith("transfer/"))
        start = time.time()
        transfer_layers = run_transfer(model, data.train, data.heldout, cfg.transfer, cfg.seed, store, tqdm)
        timer.add("transfer", time.time() - start + restored)

    finetune_metrics = None
    if cfg.finetune.enabled and cfg.finetune.steps:
        model, finetune_metrics = run_finetune(
            model, data.train.to(device), cfg.finetune, cfg.seed, store, tqdm, data.heldout.to(device), batch
        )
        timer.add("finetune", finetune_metrics["seconds"])

    student = _stage_value(
        "student_eval", store, timer, lambda: {"ppl": perplexity(model, data.heldout, "parallel", batch, tqdm, "student ppl")}
    )
    log.info("student held-out perplexity: %.3f (teacher %.3f)", student["ppl"], teacher["ppl"])

    start = time.time()
    _save_model(model, tokenizer, out, store)
    timer.add("save", time.time() - start)

    converted = converted_layers(model)
    tokens_by_stage = {
        "fit": min(cfg.fit.sequences, len(data.train)) * cfg.seq_len if fit_layers is not None else 0,
        "transfer": sum(r["tokens"] for r in transfer_layers or []),
        "finetune": finetune_metrics["tokens"] if finetune_metrics else 0,
    }
    seconds = dict(timer.seconds)
    seconds["total"] = sum(seconds.values())  # all stages, including runs before a --resume
    seconds["this_run"] = time.time() - began
    events = [e for r in transfer_layers or [] for e in r["events"]] + (finetune_metrics or {}).get("events", [])
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
        "finetune_ppl_curve": (finetune_metrics or {}).get("ppl_curve", []),
        "config": cfg.to_dict(),
    }
    curves = {f"layer {r['layer']}": r["curve"] for r in transfer_layers or []}
    if finetune_metrics:
        curves["finetune"] = finetune_metrics["curve"]
    write_report(report, curves, out)
    return report
