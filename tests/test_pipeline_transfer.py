"""Stage 2 (transfer) and stage 3 (finetune) on a tiny random Llama."""
import math

import pytest
import torch
from pipeline_tiny import MemoryStore, NoBar, tiny_model

from distill import ConvertConfig, convert_model
from distill.pipeline import transfer as transfer_mod
from distill.pipeline.run_config import FinetuneConfig, TransferConfig
from distill.pipeline.finetune import run_finetune
from distill.pipeline.params import converted_layers, new_parameters
from distill.pipeline.data import TokenData
from distill.pipeline.train import MAX_ROLLBACKS, StageContext
from distill.pipeline.transfer import run_transfer


def _student(**cfg):
    model = convert_model(tiny_model(), ConvertConfig(**cfg))
    model.requires_grad_(False)
    for i in converted_layers(model):
        for p in new_parameters(model.model.layers[i].self_attn).values():
            p.requires_grad_(True)
    return model


IDS = torch.randint(2, 40, (6, 32), generator=torch.Generator().manual_seed(0))
DATA = TokenData(train=IDS[:4], heldout=IDS[4:])


def _ctx(store=None):
    return StageContext(seed=0, store=store if store is not None else MemoryStore(), progress=NoBar)


@pytest.mark.parametrize(
    "cfg",
    [
        {"feature_map": "hedgehog"},
        {"feature_map": "hedgehog", "window": 4},
        {"feature_map": "poly", "feature_map_kwargs": {"rank": 4}, "decay": "learned"},
    ],
)
@pytest.mark.parametrize("inputs", ["teacher", "student"])
def test_transfer_lowers_the_mse(cfg, inputs):
    model = _student(**cfg)
    results = run_transfer(model, DATA, TransferConfig(steps=25, lr=0.02, inputs=inputs), _ctx())
    assert [r.layer for r in results] == [0, 1]
    for r in results:
        assert r.transfer_mse_after < r.transfer_mse_before
        assert r.events == [] and len(r.curve) == 25


def test_stacked_sublayers_train():
    model = _student(feature_map="hedgehog", depth=2)
    results = run_transfer(model, DATA, TransferConfig(steps=20, lr=0.005), _ctx())
    assert all(sum(r.curve[-5:]) < sum(r.curve[:5]) for r in results)
    assert any(float(p.abs().sum()) > 0 for p in (layer.self_attn.stack[0].w_o for layer in model.model.layers))


def test_transfer_with_attention_cross_entropy():
    model = _student(feature_map="hedgehog")
    cfg = TransferConfig(steps=10, lr=0.02, xent_weight=0.5, xent_queries=8)
    results = run_transfer(model, DATA, cfg, _ctx())
    assert all(r.transfer_mse_after < r.transfer_mse_before for r in results)


def test_teacher_weights_stay_frozen():
    model = _student(feature_map="hedgehog", window=4)
    before = {n: p.clone() for n, p in model.named_parameters() if "proj_" not in n and "log_mix" not in n}
    run_transfer(model, DATA, TransferConfig(steps=5), _ctx())
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n


def test_nan_loss_rolls_back_and_is_reported(monkeypatch):
    model = _student(feature_map="hedgehog")
    real = transfer_mod.student_output
    calls = {"n": 0}

    def poisoned(attn, q, k, v, rope=None):
        calls["n"] += 1
        out = real(attn, q, k, v, rope)
        return out * float("nan") if attn.layer_idx == 0 and calls["n"] == 4 else out  # call 1 is the MSE before training: step 2

    snapshot = {}

    def spy(attn, *args, **kwargs):
        result = real_train(attn, *args, **kwargs)
        snapshot[attn.layer_idx] = {n: p.detach().clone() for n, p in new_parameters(attn).items()}
        return result

    real_train = transfer_mod.train_layer
    monkeypatch.setattr(transfer_mod, "student_output", poisoned)
    monkeypatch.setattr(transfer_mod, "train_layer", spy)
    results = run_transfer(model, DATA, TransferConfig(steps=8, lr=0.02), _ctx())
    events = results[0].events
    assert len(events) == 1 and events[0]["step"] == 2 and "lower transfer.lr" in events[0]["hint"]
    assert results[1].events == []  # does not spread to the next layer
    for params in snapshot.values():
        assert all(torch.isfinite(p).all() for p in params.values())
    assert math.isfinite(results[0].transfer_mse_after) and results[0].transfer_mse_after < results[0].transfer_mse_before


def test_repeated_nan_stops_the_layer_at_its_last_good_state(monkeypatch):
    model = _student(feature_map="hedgehog")
    real = transfer_mod.student_output
    monkeypatch.setattr(
        transfer_mod, "student_output", lambda attn, q, k, v, rope=None: real(attn, q, k, v, rope) * (float("inf") if attn.layer_idx == 1 else 1.0)
    )
    start = {n: p.detach().clone() for n, p in new_parameters(model.model.layers[1].self_attn).items()}
    results = run_transfer(model, DATA, TransferConfig(steps=8), _ctx())
    assert len(results[1].events) == MAX_ROLLBACKS
    for n, p in new_parameters(model.model.layers[1].self_attn).items():
        assert torch.equal(p, start[n])


def _kl(teacher_logits, model):
    with torch.no_grad():
        logq = torch.log_softmax(model(IDS, distill_mode="parallel", use_cache=False).logits, -1)
    logp = torch.log_softmax(teacher_logits, -1)
    return float((logp.exp() * (logp - logq)).sum(-1).mean())


def test_finetune_lowers_the_kl_and_merges():
    model = _student(feature_map="hedgehog", window=4)
    with torch.no_grad():
        teacher = model(IDS, distill_mode="teacher", use_cache=False).logits
    before = _kl(teacher, model)
    cfg = FinetuneConfig(enabled=True, steps=12, batch_size=3, lr=1e-2, lora_rank=4, checkpoint_every=5)
    store = MemoryStore()
    metrics = run_finetune(model, TokenData(train=IDS, heldout=IDS[:2]), cfg, _ctx(store))
    merged = model
    assert metrics.steps == 12 and len(metrics.curve) == 12
    assert _kl(teacher, merged) < 0.8 * before
    assert store.meta("finetune")["step"] == 12
    assert type(merged).__name__ == "DistillLlamaForCausalLM"
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_finetune_nan_rolls_back_and_is_reported(monkeypatch):
    from distill.pipeline import finetune as finetune_mod

    model = _student(feature_map="hedgehog")
    real, calls = finetune_mod.distill_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs) * (float("nan") if calls["n"] == 3 else 1.0)  # step index 2

    monkeypatch.setattr(finetune_mod, "distill_loss", poisoned)
    cfg = FinetuneConfig(enabled=True, steps=6, batch_size=2, lr=1e-2, lora_rank=4, checkpoint_every=100)
    metrics = run_finetune(model, TokenData(train=IDS, heldout=IDS[:2]), cfg, _ctx())
    merged = model
    assert [e["step"] for e in metrics.events] == [2] and "lower finetune.lr" in metrics.events[0]["hint"]
    assert metrics.steps == 6 and len(metrics.curve) == 6 and all(math.isfinite(v) for v in metrics.curve)
    assert all(torch.isfinite(p).all() for p in merged.parameters())


def test_evicted_readout_and_its_target_equal_explicit_weights():
    """The linear part's own readout of the evicted keys, and the teacher's attention over them,
    against the explicit quadratic references of attention_weights (window 5, learned decay)."""
    from distill.pipeline.attention_weights import student_kernel, teacher_scores

    model = _student(feature_map="hedgehog", window=5, decay="learned")
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 23, 4, 8, generator=g) * 2, torch.randn(2, 23, 2, 8, generator=g) * 2, torch.randn(2, 23, 2, 8, generator=g)
    idx = torch.arange(5, 23)
    lag = idx[:, None] - torch.arange(23)[None, :]
    old = lag >= 5  # (n, T) keys that left the window
    vh = v.repeat_interleave(2, dim=2)  # (B, T, H, D)
    with torch.no_grad():
        kappa = student_kernel(attn, q, k, idx) * old  # (B, H, n, T)
        ref = torch.einsum("bhts,bshd->bthd", kappa, vh) / (kappa.sum(-1).transpose(1, 2)[..., None] + attn.eps)
        torch.testing.assert_close(attn.evicted_readout(q, k, v), ref, atol=1e-5, rtol=1e-4)
        p = torch.softmax(teacher_scores(attn, q, k, idx).masked_fill(~old, float("-inf")), -1)
        torch.testing.assert_close(attn.teacher_evicted_attention(q, k, v), torch.einsum("bhts,bshd->bthd", p, vh), atol=1e-5, rtol=1e-4)


def test_evicted_loss_trains_the_linear_part_toward_the_kv_cache_readout():
    """With the term, the linear part's readout of the evicted keys ends closer to the teacher's
    than the same training without it."""
    after = {}
    for weight in (0.0, 1.0):
        model = _student(feature_map="hedgehog", window=4)
        attn = model.model.layers[0].self_attn
        x = model.model.embed_tokens(IDS[4:])
        q, k, v, _ = transfer_mod.teacher_targets(attn, model.model.layers[0].input_layernorm(x), transfer_mod.position_embeddings(model, x), 2)
        run_transfer(model, DATA, TransferConfig(steps=25, lr=0.02, evicted_weight=weight), _ctx())
        with torch.no_grad():
            after[weight] = float(transfer_mod.evicted_loss(attn, q, k, v))
    assert after[1.0] < 0.8 * after[0.0]


def test_evicted_weight_needs_a_window():
    from distill.errors import DistillError
    from distill.pipeline.run_config import load_run_config

    with pytest.raises(DistillError, match="transfer.evicted_weight needs model.window > 0"):
        load_run_config(None, ["model.window=0", "transfer.evicted_weight=1"])


def test_finetune_activation_checkpointing_recomputes_and_takes_the_same_steps():
    """``activation_checkpointing`` runs every decoder layer again in the backward pass, and ends
    at the student that training without it reaches."""
    cfg = dict(enabled=True, steps=4, batch_size=2, lr=1e-2, lora_rank=4, checkpoint_every=100)
    plain = _student(feature_map="hedgehog", window=4)
    run_finetune(plain, DATA, FinetuneConfig(**cfg), _ctx())

    model = _student(feature_map="hedgehog", window=4)
    calls = {"n": 0}

    def count(module, args):
        calls["n"] += torch.is_grad_enabled()

    model.model.layers[0].mlp.register_forward_pre_hook(count)
    run_finetune(model, DATA, FinetuneConfig(**cfg, activation_checkpointing=True), _ctx())
    assert calls["n"] == 2 * 4  # each step's student forward, then its recomputation
    assert not any(layer.gradient_checkpointing for layer in model.model.layers)  # switched off again
    for (name, a), (_, b) in zip(plain.state_dict().items(), model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_position_shift_trains_on_moved_positions_with_unmoved_targets(monkeypatch):
    """``transfer.position_shift``: the teacher's attention output does not change when every
    position moves (so the targets stay), the student's does, and each training step's q is the
    layer's projection of one pool sequence at positions moved by some offset in 0..shift."""
    from distill.pipeline.layerwise import attention_input, embed, position_embeddings

    model = _student(feature_map="hedgehog", window=4)
    attn = model.model.layers[0].self_attn
    x = attention_input(model, 0, embed(model, DATA.train, 4))  # (4, 32, hidden)
    with torch.no_grad():
        at = {o: attn.project(x, position_embeddings(model, x[:1], o)) for o in range(41)}
        for o in (0, 17, 40):
            torch.testing.assert_close(attn.teacher_attention(*at[o]), attn.teacher_attention(*at[0]), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(attn.student_attention(*at[40]), attn.student_attention(*at[0]), atol=1e-3)

    seen, real = [], transfer_mod.student_output

    def record(layer, q, k, v, rope=None):
        if torch.is_grad_enabled() and layer.layer_idx == 0:
            seen.append(q.detach().clone())
        return real(layer, q, k, v, rope)

    monkeypatch.setattr(transfer_mod, "student_output", record)
    run_transfer(model, DATA, TransferConfig(steps=6, batch_size=1, position_shift=40), _ctx())
    offsets = []
    for q in seen:
        match = [(o, r) for o in at for r in range(4) if torch.allclose(q[0], at[o][0][r], atol=1e-6)]
        assert match, "a step trained on q that no pool sequence has at any offset in 0..40"
        offsets.append(match[0][0])
    assert len(offsets) == 6 and len(set(offsets)) > 1 and max(offsets) > 0
