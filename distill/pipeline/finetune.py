"""Stage 3, finetune (optional): LoRA on the attention projections, trained end to end on logits.

peft adds LoRA adapters to ``targets`` (q/k/v/o by default; the converted layers share these
modules with the teacher). With ``train_new_params`` the feature maps, mixing factors, decays and
stack sublayers train too. The teacher is the same model with the adapters disabled and
``distill_mode="teacher"``, so no second copy of the weights is needed (LoLCATs' second step):

    loss = kl_weight · τ² KL(softmax(z_teacher/τ) ‖ softmax(z_student/τ)) + lm_weight · CE(next token)

averaged over tokens. Checkpoints every ``checkpoint_every`` steps hold the trainable tensors and
the optimizer state; batches (and ``crop`` windows) are drawn from a generator seeded by
(seed, step), so a resumed run matches an uninterrupted one. With ``eval_every`` the held-out
perplexity is measured along the way: the report's perplexity-against-tokens curve. Steps are
guarded (:class:`.train.GuardedSteps`). At the end the adapters are merged into the weights, so
the result is a plain converted model that :func:`distill.load_converted` reads. With several
ranks (``ctx.comm``) each step's batch is split ``rank::world`` and the gradients are summed
(data parallel), which gives the one-process steps. With a sharded model (``fsdp=true``) every rank
runs every forward (a rank without sequences runs one with zero weight), LoRA and the new
parameters stay whole on every rank, and the merge adds each adapter to the weight shards. The q/k/v/o
projections are shared by the student and its ``teacher`` mode, so after the merge that mode runs
the finetuned projections, not the original teacher's (the report says so).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..distributed import is_sharded
from ..errors import DistillError
from .layerwise import decoder_layers
from .params import converted_layers, new_parameters
from .perplexity import perplexity
from .run_config import FinetuneConfig
from .train import GuardedSteps, StageContext, constrain

log = logging.getLogger(__name__)

KEY = "finetune"


@dataclass
class FinetuneResult:
    """Steps and tokens trained, seconds (including runs before a resume), the loss curve,
    rollback events and the held-out perplexity curve ({step, tokens, ppl})."""

    steps: int
    tokens: int
    seconds: float
    curve: list[float] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    ppl_curve: list[dict] = field(default_factory=list)


def check_targets(model, targets: list[str]) -> None:
    """Refuse LoRA ``targets`` that name no module of ``model`` (before any slow work): peft would
    adapt the others silently (Phi-3 has one fused ``qkv_proj``, not q/k/v)."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        attention = sorted(n for n in names if n.endswith("_proj"))
        raise DistillError(
            f"finetune.targets names {', '.join(missing)}, which this model does not have; "
            f"its projections are {', '.join(attention)}: name the ones to adapt, e.g. finetune.targets=[{attention[-1]}]"
        )


def add_lora(model, cfg: FinetuneConfig, seed: int):
    """Wrap ``model`` in a peft model with LoRA on ``cfg.targets``; new params made trainable."""
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.targets), lora_dropout=0.0, bias="none")
        peft_model = get_peft_model(model, lora)
    if cfg.train_new_params:
        for i in converted_layers(model):
            for p in new_parameters(decoder_layers(model)[i].self_attn).values():
                p.requires_grad_(True)
    return peft_model


@torch.no_grad()
def merge_lora(peft_model):
    """``merge_and_unload``; on a sharded model each adapter's B·A·scale goes into the weight's
    shards (every rank holds the whole adapter, so each cuts its own shard of it)."""
    if not is_sharded(peft_model.get_base_model()):
        return peft_model.merge_and_unload()
    from peft.tuners.lora import LoraLayer
    from torch.distributed.tensor import DTensor, distribute_tensor

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            weight = module.get_base_layer().weight
            for adapter in module.active_adapters:
                delta = module.get_delta_weight(adapter).to(weight.dtype)  # (out, in)
                if isinstance(weight, DTensor):
                    delta = distribute_tensor(delta, weight.device_mesh, weight.placements, src_data_rank=None)
                weight.add_(delta)
    return peft_model.unload()


def trainable(peft_model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in peft_model.named_parameters() if p.requires_grad}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Adam's per-parameter state as flat tensors: ``optim.{index}.{name}``."""
    out = {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            out[f"optim.{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    full = optimizer.state_dict()
    full["state"] = state
    optimizer.load_state_dict(full)


def distill_loss(student_logits, teacher_logits, ids, cfg: FinetuneConfig) -> torch.Tensor:
    """KL(teacher ‖ student) at temperature τ (scaled by τ²) plus optional next-token CE."""
    loss = student_logits.new_zeros((), dtype=torch.float32)
    if cfg.kl_weight:
        t = cfg.temperature
        logq = F.log_softmax(student_logits.float() / t, dim=-1)
        logp = F.log_softmax(teacher_logits.float() / t, dim=-1)
        kl = (logp.exp() * (logp - logq)).sum(-1).mean()
        loss = loss + cfg.kl_weight * t * t * kl
    if cfg.lm_weight:
        ce = F.cross_entropy(student_logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
        loss = loss + cfg.lm_weight * ce
    return loss


def draw_batch(ids: torch.Tensor, cfg: FinetuneConfig, seed: int, step: int) -> torch.Tensor:
    """The sequences (or ``crop``-token windows) of step ``step``: [B, T or crop]."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    rows = torch.randint(len(ids), (min(cfg.batch_size, len(ids)),), generator=generator)
    batch = ids[rows.to(ids.device)]
    if cfg.crop and cfg.crop < ids.shape[1]:
        start = int(torch.randint(ids.shape[1] - cfg.crop + 1, (1,), generator=generator))
        batch = batch[:, start : start + cfg.crop]
    return batch


def run_finetune(model, data, cfg: FinetuneConfig, ctx: StageContext, eval_batch: int = 1) -> FinetuneResult:
    """Train on ``data.train``, checkpoint, merge the adapters into ``model`` (in place); the
    ``eval_every`` perplexity curve is measured on ``data.heldout`` in batches of ``eval_batch``."""
    ids, heldout = data.train.to(ctx.device), data.heldout.to(ctx.device)
    peft_model = add_lora(model, cfg, ctx.seed)
    params = trainable(peft_model)
    names = list(params)
    start, curve, events, seconds, ppl_curve = 0, [], [], 0.0, []
    if ctx.store.has(KEY):
        tensors, meta = ctx.store.load(KEY)
        with torch.no_grad():
            for n in names:
                params[n].copy_(tensors[f"param.{n}"])
        start, curve, events, seconds = meta["step"], meta["curve"], meta["events"], meta["seconds"]
        ppl_curve = meta["ppl_curve"]
        log.info("finetune: resuming at step %d/%d", start, cfg.steps)
    attns = [decoder_layers(model)[i].self_attn for i in converted_layers(model)]
    steps = GuardedSteps(
        params,
        lambda ps, lr: torch.optim.AdamW(ps, lr=lr, weight_decay=0.0),
        cfg.lr,
        cfg.steps,
        where="finetune",
        hint="lower finetune.lr",
        after_step=lambda: constrain(attns),
        events=events,
        event_fields={"stage": "finetune"},
        comm=ctx.comm,
    )
    if ctx.store.has(KEY):
        load_optimizer_tensors(steps.optimizer, tensors)

    sharded = is_sharded(model)

    def loss_at(step: int) -> torch.Tensor:
        """This rank's share of step ``step``'s loss (the shares of all ranks sum to it)."""
        batch = draw_batch(ids, cfg, ctx.seed, step)
        x = batch[ctx.comm.shard(len(batch))].to(ctx.device)
        share = len(x) / len(batch)
        if not len(x):  # more ranks than sequences per step
            if not sharded:
                return sum(p.sum() * 0.0 for p in params.values())
            x = batch[:1].to(ctx.device)  # every rank joins every sharded forward and backward
        with torch.no_grad(), peft_model.disable_adapter():
            teacher = peft_model(input_ids=x, distill_mode="teacher", use_cache=False).logits
        student = peft_model(input_ids=x, distill_mode="parallel", use_cache=False).logits
        return share * distill_loss(student, teacher, x, cfg)

    if cfg.activation_checkpointing:  # transformers recomputes each decoder layer in the backward pass
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)({"use_reentrant": False})
    bar = ctx.progress(total=cfg.steps, initial=start, desc="finetune", unit="step")
    began = time.time()
    peft_model.train()
    step = start
    try:
        while step < cfg.steps:
            value = steps.step(loss_at(step), step)
            if value is None:
                if steps.exhausted:
                    break
                continue
            curve.append(value)
            step += 1
            bar.set_postfix(loss=f"{value:.4f}")
            bar.update(1)
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                peft_model.eval()
                ppl = perplexity(peft_model, heldout, "parallel", eval_batch, comm=ctx.comm)
                peft_model.train()
                ppl_curve.append({"step": step, "tokens": step * min(cfg.batch_size, len(ids)) * (cfg.crop or ids.shape[1]), "ppl": ppl})
                log.info("finetune step %d: held-out perplexity %.3f", step, ppl)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                tensors = {f"param.{n}": p for n, p in params.items()} | optimizer_tensors(steps.optimizer)
                meta = {"step": step, "curve": curve, "events": steps.events, "ppl_curve": ppl_curve, "seconds": seconds + time.time() - began}
                ctx.store.save(KEY, tensors, meta)
    finally:
        bar.close()
        if cfg.activation_checkpointing:
            getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
    peft_model.eval()
    with torch.no_grad():
        steps.finish(lambda: float(loss_at(cfg.steps)))
    merged = merge_lora(peft_model)
    for p in merged.parameters():
        p.requires_grad_(False)
    return FinetuneResult(
        steps=step,
        tokens=step * min(cfg.batch_size, len(ids)) * (cfg.crop or ids.shape[1]),
        seconds=seconds + time.time() - began,
        curve=curve,
        events=steps.events,
        ppl_curve=ppl_curve,
    )
