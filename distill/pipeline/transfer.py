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

Steps are guarded (:class:`.train.GuardedSteps`): a non-finite loss rolls the layer back to its
last good parameters, halves the learning rate and is reported; after ``MAX_ROLLBACKS`` the layer
keeps its last good state, and the final parameters are kept only if their held-out error is finite.

With several ranks (``ctx.comm``): teacher inputs make the layers independent, so each rank
trains a contiguous block of the layers still to do (:func:`.distributed.split_blocks`), after one
data-parallel teacher pass that hands each rank the hidden states entering its block; the ranks
swap their finished layers after each round, and rank 0 checkpoints them. Student inputs chain
the layers, so each layer trains data-parallel: every step's global batch is split ``rank::world``
and the gradients are summed, which gives the one-process result. A sharded model (``fsdp=true``)
trains every layer that way, with teacher inputs too: each layer's weights are gathered on every
rank while it trains.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch

from ..layer import LinearAttention
from .attention_weights import attention_xent, query_index, student_weights, teacher_scores
from ..distributed import Comm, gathered, is_sharded, split_blocks
from .layerwise import attention_input, decoder_layers, embed, position_embeddings, run_layer
from .params import converted_layers, layer_state, load_state, new_parameters
from .run_config import TransferConfig
from .train import GuardedSteps, StageContext, constrain

log = logging.getLogger(__name__)

CURVE_POINTS = 100


@dataclass
class TransferLayer:
    """Result of one layer: relative (and absolute) MSE of its output on held-out text before and
    after training, the work done, the subsampled loss curve and any rollback events."""

    layer: int
    transfer_mse_before: float
    transfer_mse_after: float
    transfer_mse_before_abs: float
    transfer_mse_after_abs: float
    steps: int
    tokens: int
    seconds: float
    curve: list[float] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)


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


def sharded_targets(model, attn: LinearAttention, hidden, rope, batch: int, comm: Comm):
    """:func:`teacher_targets` of hidden [N,T,hidden] entering ``attn``'s layer, each rank computing
    its rows ``rank::world``; every rank gets all N rows."""
    part = teacher_targets(attn, attention_input(model, attn.layer_idx, hidden[comm.shard(len(hidden))]), rope, batch)
    return tuple(comm.cat_shards(t, len(hidden)) for t in part)


def student_output(attn: LinearAttention, q, k, v, rope=None) -> torch.Tensor:
    """The replacement layer's output o_proj(y) [B,T,hidden] from precomputed q, k, v (at the
    positions whose RoPE is ``rope``)."""
    y = attn.student_attention(q, k, v, position_embeddings=rope)  # (B, T, H, D) fp32
    return attn.o_proj(y.to(q.dtype).reshape(*y.shape[:2], -1))


@torch.no_grad()
def relative_mse(attn: LinearAttention, q, k, v, target, batch: int, rope=None) -> tuple[float, float]:
    """(MSE, MSE / mean(target²)) of the layer's output against the teacher's, over all rows."""
    err = power = 0.0
    for i in range(0, len(q), batch):
        out = student_output(attn, q[i : i + batch], k[i : i + batch], v[i : i + batch], rope).float()
        t = target[i : i + batch].float()
        err += float(((out - t) ** 2).sum())
        power += float((t**2).sum())
    count = target.numel()
    return err / count, err / max(power, 1e-30)


def evicted_loss(attn: LinearAttention, q, k, v, comm: Comm | None = None, rope=None) -> torch.Tensor:
    """Relative MSE of the linear part's own readout of the evicted keys against the teacher's
    attention over those keys (see :meth:`LinearAttention.evicted_readout`), normalised by the
    target's power over the whole global batch (every rank's rows)."""
    with torch.no_grad():
        target = attn.teacher_evicted_attention(q, k, v).float()  # (B, T−w, H, D)
    out = attn.evicted_readout(*attn.feature_inputs(q, k, rope), v)
    (power,) = (comm or Comm()).sum(float(target.pow(2).sum()))
    return (out - target).pow(2).sum() / max(power, 1e-30)


def train_layer(
    attn: LinearAttention, q, k, v, target, cfg: TransferConfig, seed: int, check, bar=None, comm: Comm | None = None, reproject=None,
    rope=None,
) -> dict:
    """Adam on the layer's new parameters; ``check()`` is the held-out loss that decides whether the
    final parameters are kept (see :meth:`GuardedSteps.finish`). With ``comm`` the ranks hold the
    same pool and each computes its share ``rank::world`` of every batch. ``rope``: the RoPE of the
    pool's positions. With ``cfg.position_shift``, ``reproject(rows, offset)`` gives q, k, v of those
    rows at RoPE positions moved by ``offset``, and that RoPE (the targets do not move). Returns
    {curve, events}."""
    comm = comm or Comm()
    params = new_parameters(attn)
    if not params or not cfg.steps:
        return {"curve": [], "events": []}
    power = max(float(target.float().pow(2).mean()), 1e-30)
    generator = torch.Generator().manual_seed(seed)
    steps = GuardedSteps(
        params,
        lambda ps, lr: torch.optim.Adam(ps, lr=lr),
        cfg.lr,
        cfg.steps,
        where=f"layer {attn.layer_idx}",
        hint="lower transfer.lr",
        after_step=lambda: constrain([attn]),
        event_fields={"stage": "transfer", "layer": attn.layer_idx},
        comm=comm,
    )
    idx = query_index(q.shape[1], cfg.xent_queries, start=attn.window, device=q.device)
    sliding = attn.teacher_sliding_window
    evicted = cfg.evicted_weight and attn.window and q.shape[1] > attn.window and (sliding is None or sliding > attn.window)
    curve = []
    for step in range(cfg.steps):
        rows = torch.randint(len(q), (min(cfg.batch_size, len(q)),), generator=generator).to(q.device)
        if cfg.position_shift:
            offset = int(torch.randint(cfg.position_shift + 1, (1,), generator=generator))
            qkv = lambda mine: reproject(mine, offset)  # noqa: E731
        else:
            qkv = lambda mine: (q[mine], k[mine], v[mine], rope)  # noqa: E731
        value = steps.step(batch_loss(attn, qkv, target, rows, cfg, idx, power, evicted, comm), step)
        if value is None:
            if steps.exhausted:
                break
            continue
        curve.append(value)
        if bar is not None:
            bar.set_postfix(layer=attn.layer_idx, loss=f"{value:.4f}")
            bar.update(1)
    steps.finish(check)
    stride = max(1, len(curve) // CURVE_POINTS)
    return {"curve": curve[::stride], "events": steps.events}


def batch_loss(attn, qkv, target, rows, cfg: TransferConfig, idx, power: float, evicted: bool, comm: Comm) -> torch.Tensor:
    """This rank's share of the loss on the global batch ``rows``: its rows ``rank::world`` (q, k, v
    from ``qkv(rows)``), each term weighted so that the shares sum to the one-process loss."""
    mine = rows[comm.shard(len(rows))]
    if not len(mine):  # more ranks than rows: a zero share that still has a graph
        return sum(p.sum() * 0.0 for p in new_parameters(attn).values())
    share = len(mine) / len(rows)
    qb, kb, vb, rope = qkv(mine)
    out = student_output(attn, qb, kb, vb, rope)
    loss = share * (out.float() - target[mine].float()).pow(2).mean() / power
    if cfg.xent_weight:
        with torch.no_grad():
            scores = teacher_scores(attn, qb, kb, idx)
        weights = student_weights(attn, *attn.feature_inputs(qb, kb, rope), idx, scores)
        loss = loss + share * cfg.xent_weight * attention_xent(scores, weights)
    if evicted:
        loss = loss + cfg.evicted_weight * evicted_loss(attn, qb, kb, vb, comm, rope)
    return loss


def run_transfer(model, data, cfg: TransferConfig, ctx: StageContext) -> list[TransferLayer]:
    """Train every converted layer in turn on ``data.train`` (held-out error on ``data.heldout``);
    each finished layer is checkpointed under :func:`layer_key` and restored on resume."""
    if ctx.comm.active and cfg.inputs == "teacher" and not is_sharded(model):
        return _run_layer_parallel(model, data, cfg, ctx)
    comm = ctx.comm
    layers = decoder_layers(model)
    converted = converted_layers(model)
    ids = data.train[: cfg.sequences] if cfg.sequences else data.train
    batch = max(1, cfg.batch_size)
    mode = "teacher" if cfg.inputs == "teacher" else "parallel"
    hidden = embed(model, ids, batch)
    val = embed(model, data.heldout[: max(1, cfg.eval_sequences)], batch)
    rope = position_embeddings(model, hidden[:1])
    results = []
    todo = sum(cfg.steps for i in converted if not ctx.store.has(layer_key(i)))
    bar = ctx.progress(total=todo, desc="transfer", unit="step")
    try:
        for i in range(len(layers)):
            if i > max(converted, default=-1):
                break
            if i in converted:
                key = layer_key(i)
                if ctx.store.has(key):
                    tensors, meta = ctx.store.load(key)
                    load_state(model, tensors, [i])
                    result = TransferLayer(**meta)
                else:
                    result = transfer_layer(model, layers[i].self_attn, hidden, val, rope, cfg, ctx.seed, batch, bar, comm)
                    ctx.store.save(key, layer_state(model, i), asdict(result))
                results.append(result)
                log.info("layer %d: relative MSE %.4f -> %.4f", i, result.transfer_mse_before, result.transfer_mse_after)
            hidden = sharded_layer(model, i, hidden, mode, batch, comm)
            val = sharded_layer(model, i, val, mode, batch, comm)
    finally:
        bar.close()  # also on an error, so that its one line starts a line of its own
    return results


def sharded_layer(model, index: int, hidden: torch.Tensor, mode: str, batch: int, comm: Comm) -> torch.Tensor:
    """:func:`run_layer` over hidden [N,T,hidden], each rank pushing its rows ``rank::world``;
    every rank gets all N rows back."""
    part = run_layer(model, index, hidden[comm.shard(len(hidden))], mode, batch)
    return comm.cat_shards(part, len(hidden))


def _run_layer_parallel(model, data, cfg: TransferConfig, ctx: StageContext) -> list[TransferLayer]:
    """Teacher-input transfer over several ranks (see the module docstring)."""
    comm, store = ctx.comm, ctx.store
    converted = converted_layers(model)
    ids = data.train[: cfg.sequences] if cfg.sequences else data.train
    batch = max(1, cfg.batch_size)
    done = {}
    for i in converted:
        if store.has(layer_key(i)):
            tensors, meta = store.load(layer_key(i))
            load_state(model, tensors, [i])
            done[i] = TransferLayer(**meta)
    todo = [i for i in converted if i not in done]
    # Every layer to do costs the same steps on the same shapes; blocks balance that estimate.
    blocks = split_blocks([float(cfg.steps)] * len(todo), comm.world)
    if comm.main:
        idle = sum(not b for b in blocks)
        if idle:
            log.warning("transfer: %d rank(s) idle: %d layers to train over %d ranks", idle, len(todo), comm.world)
        log.info("transfer: layers per rank %s", [[todo[j] for j in b] for b in blocks])
    mine = [todo[j] for j in blocks[comm.rank]]
    starts = {todo[b[0]]: r for r, b in enumerate(blocks) if b}  # first layer of a block -> its rank

    # One data-parallel teacher pass hands each rank the hidden states entering its block.
    hidden = embed(model, ids[comm.shard(len(ids))], batch)
    heldout = data.heldout[: max(1, cfg.eval_sequences)]
    val = embed(model, heldout[comm.shard(len(heldout))], batch)
    rope = position_embeddings(model, embed(model, ids[:1], 1))
    own = None
    for i in range(max(starts, default=-1) + 1):
        if i in starts:
            full = comm.cat_shards(hidden, len(ids)), comm.cat_shards(val, len(heldout))
            if starts[i] == comm.rank:
                own = full
        hidden = run_layer(model, i, hidden, "teacher", batch)
        val = run_layer(model, i, val, "teacher", batch)
    del hidden, val

    results = dict(done)
    bar = ctx.progress(total=cfg.steps * len(todo), desc="transfer", unit="step")
    try:
        at = mine[0] if mine else None
        for round_ in range(max((len(b) for b in blocks), default=0)):
            finished = None
            if round_ < len(mine):
                i = mine[round_]
                hidden, val = own
                while at < i:  # through the layers between this rank's (kept or already done)
                    hidden, val = run_layer(model, at, hidden, "teacher", batch), run_layer(model, at, val, "teacher", batch)
                    at += 1
                attn = decoder_layers(model)[i].self_attn
                result = transfer_layer(model, attn, hidden, val, rope, cfg, ctx.seed, batch, bar)
                own = run_layer(model, i, hidden, "teacher", batch), run_layer(model, i, val, "teacher", batch)
                at = i + 1
                finished = (i, layer_state(model, i), asdict(result))
            for rank, got in enumerate(comm.gather(finished)):
                if got is None:
                    continue
                i, tensors, meta = got
                if rank != comm.rank:
                    load_state(model, tensors, [i])
                    bar.update(cfg.steps)
                store.save(layer_key(i), tensors, meta)
                results[i] = TransferLayer(**meta)
                log.info("layer %d: relative MSE %.4f -> %.4f", i, results[i].transfer_mse_before, results[i].transfer_mse_after)
    finally:
        bar.close()
    return [results[i] for i in converted]


def transfer_layer(
    model, attn: LinearAttention, hidden, val, rope, cfg: TransferConfig, seed: int, batch: int, bar, comm: Comm | None = None
) -> TransferLayer:
    with gathered(decoder_layers(model)[attn.layer_idx]):
        return _transfer_layer(model, attn, hidden, val, rope, cfg, seed, batch, bar, comm or Comm())


def _transfer_layer(model, attn: LinearAttention, hidden, val, rope, cfg: TransferConfig, seed: int, batch: int, bar, comm: Comm) -> TransferLayer:
    start = time.time()
    i = attn.layer_idx
    q, k, v, target = sharded_targets(model, attn, hidden, rope, batch, comm)
    vq, vk, vv, vtarget = sharded_targets(model, attn, val, rope, batch, comm)
    before_abs, before = relative_mse(attn, vq, vk, vv, vtarget, batch, rope)
    reproject = None
    if cfg.position_shift:
        x = comm.cat_shards(attention_input(model, i, hidden[comm.shard(len(hidden))]), len(hidden))  # (N, T, hidden)

        def reproject(rows, offset):
            moved = position_embeddings(model, x[:1], offset)
            return (*attn.project(x[rows], moved), moved)

    with torch.enable_grad():
        check = lambda: relative_mse(attn, vq, vk, vv, vtarget, batch, rope)[1]  # noqa: E731
        trained = train_layer(attn, q, k, v, target, cfg, seed * 1_000_003 + i, check, bar, comm, reproject, rope)
    after_abs, after = relative_mse(attn, vq, vk, vv, vtarget, batch, rope)
    return TransferLayer(
        layer=i,
        transfer_mse_before=before,
        transfer_mse_after=after,
        transfer_mse_before_abs=before_abs,
        transfer_mse_after_abs=after_abs,
        steps=cfg.steps,
        tokens=cfg.steps * min(cfg.batch_size, len(q)) * q.shape[1],
        seconds=time.time() - start,
        curve=trained["curve"],
        events=trained["events"],
    )
