"""Stage 1 (fit) and the explicit-weights reference it relies on."""
import math

import pytest
import torch
from pipeline_tiny import MemoryStore, NoBar, tiny_model

from distill import ConvertConfig, convert_model
from distill.pipeline.run_config import FitConfig
from distill.pipeline.fit import collect_qk, find_fitter, make_pairs, measure, positivity_constraints, run_fit, set_mix
from distill.pipeline.attention_weights import query_index, student_weights, teacher_scores
from distill.pipeline.data import TokenData
from distill.pipeline.train import StageContext


def _layer(**cfg):
    model = convert_model(tiny_model(), ConvertConfig(**cfg))
    return model, model.model.layers[0].self_attn


def _qkv(T=48, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, T, 4, 8, generator=g) * scale
    k = torch.randn(2, T, 2, 8, generator=g) * scale
    v = torch.randn(2, T, 2, 8, generator=g)
    return q, k, v


@pytest.mark.parametrize(
    "cfg",
    [
        {"feature_map": "hedgehog"},
        {"feature_map": "hedgehog", "window": 5, "decay": "learned"},
        {"feature_map": "poly", "feature_map_kwargs": {"degree": 2, "rank": 4}, "decay": "fixed"},
        {"feature_map": "taylor", "window": 7},
    ],
)
def test_weights_reproduce_the_layer(cfg):
    """Σ_s w_ts v_s from the explicit weights equals the layer's own (chunked) output."""
    _, layer = _layer(**cfg)
    with torch.no_grad():
        if layer.window:
            layer.log_mix.copy_(torch.linspace(-1, 1, 4))
    q, k, v = _qkv(T=37)
    idx = torch.arange(37)
    with torch.no_grad():
        w = student_weights(layer, q, k, idx)  # (B, H, T, T)
        y = layer.student_attention(q, k, v)
    vh = v.repeat_interleave(2, dim=2)  # (B, T, H, D)
    ref = torch.einsum("bhts,bshd->bthd", w, vh)
    assert torch.allclose(ref, y, atol=1e-4, rtol=1e-4)


def test_teacher_scores_match_softmax_attention():
    _, layer = _layer()
    q, k, v = _qkv(T=20)
    idx = torch.arange(20)
    p = torch.softmax(teacher_scores(layer, q, k, idx), -1)
    ref = torch.einsum("bhts,bshd->bthd", p, v.repeat_interleave(2, dim=2))
    assert torch.allclose(ref, layer.teacher_attention(q, k, v), atol=1e-5)


@pytest.mark.parametrize("kwargs", [{"degree": 2, "rank": 4}, {"degree": 2}, {"degree": 4, "rank": 3}])
def test_poly_fit_beats_the_default_init(kwargs):
    _, layer = _layer(feature_map="poly", feature_map_kwargs=kwargs)
    q, k, _ = _qkv(T=64, scale=1.5)
    cfg = FitConfig(queries=32)
    pairs = make_pairs(layer, q, k, cfg)
    before = measure(layer, pairs)
    find_fitter(layer.rnn.feature_map)(layer, pairs, cfg)
    after = measure(layer, pairs)
    assert after["attn_kl"].mean() < 0.9 * before["attn_kl"].mean()
    assert torch.isfinite(layer.rnn.feature_map.coeffs).all()
    # A positive normaliser: p(x) > 0 over a range far wider than the observed scores.
    x = torch.linspace(-200, 200, 20001, dtype=torch.float64)
    for c in layer.rnn.feature_map.coeffs.double():
        p = sum(c[i] * x**i for i in range(len(c)))
        if kwargs["degree"] == 2:
            assert bool((p > 0).all())


def test_poly_least_squares_alone_lowers_the_fit_error():
    _, layer = _layer(feature_map="poly", feature_map_kwargs={"degree": 2})
    q, k, _ = _qkv(T=64)
    cfg = FitConfig(queries=32, refine_iters=0)
    pairs = make_pairs(layer, q, k, cfg)
    before = measure(layer, pairs)
    find_fitter(layer.rnn.feature_map)(layer, pairs, cfg)
    assert measure(layer, pairs)["fit_error"].mean() < before["fit_error"].mean()


def test_positivity_constraints_degree_two():
    cons = positivity_constraints(torch.linspace(-1, 1, 11).numpy(), 1.0, 2, 0.0)
    import numpy as np

    good, bad = np.array([1.0, 0.0, 1.0]), np.array([0.1, 1.0, 0.1])  # x²+1 vs a quadratic with real roots
    assert all(np.all(c["fun"](good) >= 0) for c in cons)
    assert not all(np.all(c["fun"](bad) >= 0) for c in cons)


def test_hybrid_mix_is_fitted():
    _, layer = _layer(feature_map="hedgehog", window=8)
    q, k, _ = _qkv(T=64)
    cfg = FitConfig(queries=32)
    pairs = make_pairs(layer, q, k, cfg)
    before = measure(layer, pairs)
    find_fitter(layer.rnn.feature_map)(layer, pairs, cfg)
    set_mix(layer, pairs)
    after = measure(layer, pairs)
    assert not torch.allclose(layer.log_mix, torch.zeros(4))
    assert after["attn_kl"].mean() <= before["attn_kl"].mean() + 1e-6
    assert math.isfinite(float(after["fit_error"].mean()))


def test_run_fit_reports_every_layer_and_head():
    model, _ = _layer(feature_map="poly", feature_map_kwargs={"degree": 2, "rank": 4})
    ids = torch.randint(0, 40, (2, 32), generator=torch.Generator().manual_seed(0))
    store = MemoryStore()
    results = run_fit(model, TokenData(train=ids, heldout=ids[:1]), FitConfig(sequences=2, queries=16), StageContext(0, store, NoBar))
    assert [r.layer for r in results] == [0, 1]
    for r in results:
        assert len(r.heads) == 4
        assert r.attn_kl <= r.attn_kl_init + 1e-6
        assert all(math.isfinite(x) for x in (r.fit_error, r.attn_kl, r.fit_error_init, r.attn_kl_init))
    # checkpointed by the stage itself: a second call restores the fitted parameters and results
    fitted = {n: p.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.model.layers[0].self_attn.rnn.feature_map.coeffs.zero_()
    assert run_fit(model, TokenData(train=ids, heldout=ids[:1]), FitConfig(), StageContext(0, store, NoBar)) == results
    assert all(torch.equal(p, fitted[n]) for n, p in model.named_parameters())


def test_collect_qk_matches_the_teacher_forward():
    model, _ = _layer()
    ids = torch.randint(0, 40, (1, 16), generator=torch.Generator().manual_seed(1))
    captured = {}

    def hook(module, args, kwargs):
        q, k, _ = module.project(kwargs["hidden_states"], kwargs["position_embeddings"])
        captured[module.layer_idx] = (q, k)

    handles = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        model(ids, distill_mode="teacher", use_cache=False)
    for h in handles:
        h.remove()
    for i, q, k, _ in collect_qk(model, ids, [0, 1], batch=1):
        assert torch.allclose(q, captured[i][0], atol=1e-5) and torch.allclose(k, captured[i][1], atol=1e-5)


def test_query_index():
    idx = query_index(100, 10, start=20)
    assert idx[0] == 20 and idx[-1] == 99 and len(idx) == 10


def test_training_keeps_the_polynomial_positive():
    _, layer = _layer(feature_map="poly", feature_map_kwargs={"degree": 2, "rank": 4})
    fm = layer.rnn.feature_map
    with torch.no_grad():
        fm.coeffs.copy_(torch.tensor([[0.1, 1.0, 0.1], [-1.0, 0.0, 0.5], [1.0, 2.0, -0.3], [0.2, 0.0, 1.0]]))
    fm.constrain_()
    x = torch.linspace(-100, 100, 20001)
    for c in fm.coeffs:
        assert bool((c[0] + c[1] * x + c[2] * x * x > 0).all())
    assert torch.allclose(fm.coeffs[3], torch.tensor([0.2, 0.0, 1.0]))  # feasible rows are kept
