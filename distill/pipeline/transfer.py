"""Stage 2, transfer: train each replacement layer to reproduce its teacher attention's output.

Layer by layer (Hedgehog; LoLCATs' "attention transfer"): the hidden states entering layer i
([N, T, hidden] for the N calibration sequences) are projected once to q, k, v and to the
teacher's output o = o_proj(softmax attention) [N, T, hidden]; then only the layer's new
parameters (feature map, mixing factor, decay, stack) train with Adam on

    loss = ‖o_student − o‖² / mean(o²)  +  xent_weight · CE(teacher softmax, student weights)

(relative MSE; the optional cross-entropy on attention weights is Hedgehog's loss). The hidden
states then go through layer i, in teacher mode (``inputs: teacher``) or as the trained student
(``inputs: student``), to become layer i+1's inputs, so memory stays near one layer's
activations. Each layer is checkpointed when done; a resumed run recomputes the hidden states
through the finished layers, so it ends where an uninterrupted run ends.

A non-finite loss or parameter rolls the layer back to its last good parameters, halves the
learning rate and is reported; after ``MAX_ROLLBACKS`` the layer keeps its last good state.
"""
from __future__ import annotations

import logging
import math
import time

import torch

from ..layer import LinearAttention
from .config import TransferConfig
from .fit import apply_constraints
from .params import LastGood, converted_layers, layer_state, load_state, new_parameters
from .stream import attention_input, decoder_layers, embed, position_embeddings, run_layer
from .weights import attention_xent, query_index, student_weights, teacher_scores

log = logging.getLogger(__name__)

MAX_ROLLBACKS = 3
CURVE_POINTS = 100


def layer_key(index: int) -> str:
    return f"transfer/layer_{index:03d}"


@torch.no_grad()
def teacher_targets(attn: LinearAttention, x: torch.Tensor, rope, batch: int):
    """x [N,T,hidden] -> q [N,T,H,D], k, v [N,T,Hk,D] and the teacher's output o [N,T,hidden]."""
    qs, ks, vs, outs = [], [], [], []
    for i in range(0, len(x), batch):
        q, k, v = attn.project(x[i : i + batch], rope)
        y = attn.teacher_attention(q, k, v)  # (B, T, H, D)
        outs.append(attn.o_proj(y.reshape(*y.shape[:2], -1)))
        qs.append(q), ks.append(k), vs.append(v)
    return torch.cat(qs), torch.cat(ks), torch.cat(vs), torch.cat(outs)


def student_output(attn: LinearAttention, q, k, v) -> torch.Tensor:
    """The replacement layer's output o_proj(y) [B,T,hidden] from precomputed q, k, v."""
    y = attn.student_attention(q, k, v)  # (B, T, H, D) fp32
    return attn.o_proj(y.to(q.dtype).reshape(*y.shape[:2], -1))


@torch.no_grad()
def relative_mse(attn: LinearAttention, q, k, v, target, batch: int) -> tuple[float, float]:
    """(MSE, MSE / mean(target²)) of the layer's output against the teacher's, over all rows."""
    err = power = 0.0
    for i in range(0, len(q), batch):
        out = student_output(attn, q[i : i + batch], k[i : i + batch], v[i : i + batch]).float()
        t = target[i : i + batch].float()
        err += float(((out - t) ** 2).sum())
        power += float((t**2).sum())
    count = target.numel()
    return err / count, err / max(power, 1e-30)


def cosine_lr(base: float, step: int, total: int) -> float:
    """Cosine decay from ``base`` to ``base``/10 over ``total`` steps."""
    return base * (0.1 + 0.45 * (1 + math.cos(math.pi * step / max(total, 1))))


def constrain(attn: LinearAttention) -> None:
    """Keep every feature map of the layer inside its constraints (e.g. a positive polynomial)."""
    apply_constraints(attn.rnn.feature_map)
    for sub in attn.stack:
        apply_constraints(sub.rnn.feature_map)


def train_layer(attn: LinearAttention, q, k, v, target, cfg: TransferConfig, seed: int, bar=None) -> dict:
    """Adam on the layer's new parameters; returns {curve, events, steps_done}."""
    params = new_parameters(attn)
    if not params or not cfg.steps:
        return {"curve": [], "events": []}
    power = max(float(target.float().pow(2).mean()), 1e-30)
    generator = torch.Generator().manual_seed(seed)
    lr = cfg.lr
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    last_good = LastGood(params)
    idx = query_index(q.shape[1], cfg.xent_queries, start=attn.window, device=q.device)
    curve, events = [], []
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(lr, step, cfg.steps)
        rows = torch.randint(len(q), (min(cfg.batch_size, len(q)),), generator=generator).to(q.device)
        qb, kb, vb = q[rows], k[rows], v[rows]
        out = student_output(attn, qb, kb, vb)
        loss = (out.float() - target[rows].float()).pow(2).mean() / power
        if cfg.xent_weight:
            with torch.no_grad():
                scores = teacher_scores(attn, qb, kb, idx)
            loss = loss + cfg.xent_weight * attention_xent(scores, student_weights(attn, qb, kb, idx, scores))
        value, kept = last_good.step(loss, optimizer, lambda: constrain(attn))
        if not kept:
            lr /= 2
            optimizer = torch.optim.Adam(params.values(), lr=lr)
            events.append(
                {
                    "layer": attn.layer_idx,
                    "step": step,
                    "loss": value,
                    "message": f"non-finite loss or parameters at step {step}; rolled back to the last good "
                    f"parameters and halved the learning rate to {lr:.3g}",
                    "hint": "lower transfer.lr",
                }
            )
            log.warning("layer %d: %s (hint: lower transfer.lr)", attn.layer_idx, events[-1]["message"])
            if len(events) >= MAX_ROLLBACKS:
                log.warning("layer %d: stopping after %d rollbacks; keeping its last good parameters", attn.layer_idx, MAX_ROLLBACKS)
                break
            continue
        curve.append(value)
        if bar is not None:
            bar.set_postfix(layer=attn.layer_idx, loss=f"{value:.4f}")
            bar.update(1)
    stride = max(1, len(curve) // CURVE_POINTS)
    return {"curve": curve[::stride], "events": events}


def run_transfer(model, ids: torch.Tensor, heldout: torch.Tensor, cfg: TransferConfig, seed: int, store, progress) -> list[dict]:
    """Train every converted layer in turn; returns per-layer metrics. ``store`` checkpoints
    each finished layer under :func:`layer_key` and restores finished layers on resume."""
    layers = decoder_layers(model)
    converted = converted_layers(model)
    ids = ids[: cfg.sequences] if cfg.sequences else ids
    batch = max(1, cfg.batch_size)
    mode = "teacher" if cfg.inputs == "teacher" else "parallel"
    hidden = embed(model, ids, batch)
    val = embed(model, heldout[: max(1, cfg.eval_sequences)], batch)
    rope = position_embeddings(model, hidden[:1])
    results = []
    todo = sum(cfg.steps for i in converted if not store.has(layer_key(i)))
    bar = progress(total=todo, desc="transfer", unit="step")
    for i in range(len(layers)):
        if i > max(converted, default=-1):
            break
        if i in converted:
            attn = layers[i].self_attn
            key = layer_key(i)
            if store.has(key):
                tensors, meta = store.load(key)
                load_state(model, tensors, [i])
            else:
                meta = transfer_layer(model, attn, hidden, val, rope, cfg, seed, batch, bar)
                store.save(key, layer_state(model, i), meta)
            results.append(meta)
            log.info(
                "layer %d: relative MSE %.4f -> %.4f", i, meta["transfer_mse_before"], meta["transfer_mse_after"]
            )
        hidden = run_layer(model, i, hidden, mode, batch)
        val = run_layer(model, i, val, mode, batch)
    bar.close()
    return results


def transfer_layer(model, attn: LinearAttention, hidden, val, rope, cfg: TransferConfig, seed: int, batch: int, bar) -> dict:
    start = time.time()
    i = attn.layer_idx
    q, k, v, target = teacher_targets(attn, attention_input(model, i, hidden), rope, batch)
    vq, vk, vv, vtarget = teacher_targets(attn, attention_input(model, i, val), rope, batch)
    before_abs, before = relative_mse(attn, vq, vk, vv, vtarget, batch)
    with torch.enable_grad():
        trained = train_layer(attn, q, k, v, target, cfg, seed * 1_000_003 + i, bar)
    after_abs, after = relative_mse(attn, vq, vk, vv, vtarget, batch)
    return {
        "layer": i,
        "transfer_mse_before": before,
        "transfer_mse_after": after,
        "transfer_mse_before_abs": before_abs,
        "transfer_mse_after_abs": after_abs,
        "steps": cfg.steps,
        "tokens": cfg.steps * min(cfg.batch_size, len(q)) * q.shape[1],
        "seconds": time.time() - start,
        "curve": trained["curve"],
        "events": trained["events"],
    }
