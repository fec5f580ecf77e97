"""Stage 3, finetune (optional): LoRA on the attention projections, trained end to end on logits.

peft adds LoRA adapters to ``targets`` (q/k/v/o by default; the converted layers share these
modules with the teacher). With ``train_new_params`` the feature maps, mixing factors, decays and
stack sublayers train too. The teacher is the same model with the adapters disabled and
``distill_mode="teacher"``, so no second copy of the weights is needed (LoLCATs' second step):

    loss = kl_weight · τ² KL(softmax(z_teacher/τ) ‖ softmax(z_student/τ)) + lm_weight · CE(next token)

averaged over tokens. Checkpoints every ``checkpoint_every`` steps hold the trainable tensors and
the optimizer state; batches (and ``crop`` windows) are drawn from a generator seeded by
(seed, step), so a resumed run matches an uninterrupted one. With ``eval_every`` the held-out
perplexity is measured along the way: the report's perplexity-against-tokens curve. At the end the adapters are merged into the weights, so the result
is a plain converted model that :func:`distill.load_converted` reads.
"""
from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

from .config import FinetuneConfig
from .evaluate import perplexity
from .params import LastGood, converted_layers, new_parameters
from .transfer import constrain, cosine_lr
from .stream import decoder_layers

log = logging.getLogger(__name__)

KEY = "finetune"
MAX_ROLLBACKS = 3


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


def run_finetune(model, ids: torch.Tensor, cfg: FinetuneConfig, seed: int, store, progress, heldout=None, eval_batch: int = 1):
    """Train, checkpoint, merge; returns (merged model, metrics). ``heldout`` [M, T] feeds
    the ``eval_every`` perplexity curve."""
    peft_model = add_lora(model, cfg, seed)
    params = trainable(peft_model)
    names = list(params)
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=0.0)
    start, curve, events, seconds, ppl_curve = 0, [], [], 0.0, []
    if store.has(KEY):
        tensors, meta = store.load(KEY)
        with torch.no_grad():
            for n in names:
                params[n].copy_(tensors[f"param.{n}"])
        load_optimizer_tensors(optimizer, tensors)
        start, curve, events, seconds = meta["step"], meta["curve"], meta["events"], meta["seconds"]
        ppl_curve = meta["ppl_curve"]
        log.info("finetune: resuming at step %d/%d", start, cfg.steps)
    device = next(model.parameters()).device
    lr = cfg.lr * 0.5 ** len(events)
    last_good = LastGood(params)
    attns = [decoder_layers(model)[i].self_attn for i in converted_layers(model)]

    def constrain_all() -> None:
        for attn in attns:
            constrain(attn)

    bar = progress(total=cfg.steps, initial=start, desc="finetune", unit="step")
    began = time.time()
    peft_model.train()
    step = start
    while step < cfg.steps:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(lr, step, cfg.steps)
        x = draw_batch(ids, cfg, seed, step).to(device)
        with torch.no_grad(), peft_model.disable_adapter():
            teacher = peft_model(input_ids=x, distill_mode="teacher", use_cache=False).logits
        student = peft_model(input_ids=x, distill_mode="parallel", use_cache=False).logits
        loss = distill_loss(student, teacher, x, cfg)
        value, kept = last_good.step(loss, optimizer, constrain_all)
        if not kept:
            lr /= 2
            optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
            events.append(
                {
                    "stage": "finetune",
                    "step": step,
                    "loss": value,
                    "message": f"non-finite loss or parameters at step {step}; rolled back and halved the learning rate to {lr:.3g}",
                    "hint": "lower finetune.lr",
                }
            )
            log.warning("finetune: %s (hint: lower finetune.lr)", events[-1]["message"])
            if len(events) >= MAX_ROLLBACKS:
                log.warning("finetune: stopping after %d rollbacks", MAX_ROLLBACKS)
                break
            continue
        curve.append(value)
        step += 1
        bar.set_postfix(loss=f"{value:.4f}")
        bar.update(1)
        if heldout is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            peft_model.eval()
            ppl = perplexity(peft_model, heldout, "parallel", eval_batch)
            peft_model.train()
            ppl_curve.append({"step": step, "tokens": step * x.numel(), "ppl": ppl})
            log.info("finetune step %d: held-out perplexity %.3f", step, ppl)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            tensors = {f"param.{n}": p for n, p in params.items()} | optimizer_tensors(optimizer)
            meta = {"step": step, "curve": curve, "events": events, "ppl_curve": ppl_curve, "seconds": seconds + time.time() - began}
            store.save(KEY, tensors, meta)
    bar.close()
    peft_model.eval()
    merged = peft_model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(False)
    metrics = {
        "steps": step,
        "tokens": step * min(cfg.batch_size, len(ids)) * (cfg.crop or ids.shape[1]),
        "seconds": seconds + time.time() - began,
        "curve": curve,
        "events": events,
        "ppl_curve": ppl_curve,
    }
    return merged, metrics
