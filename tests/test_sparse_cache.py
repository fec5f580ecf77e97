"""The sparse global cache (LoLA): its definition against a step-by-step reference, its two forms
against each other, and the model-level contracts (generate, padding, save/load, bad input)."""
import pytest
import torch
from conftest import (
    VOCAB,
    assert_left_padded_batch_equals_one_by_one,
    greedy_uncached,
    perturb_new_parameters,
    stepwise_logits,
    tiny_model,
)

from distill import ConvertConfig, convert_model, load_converted
from distill.convert import set_sparse_cache
from distill.errors import DistillError
from distill.layer import LinearAttention
from distill.sparse_cache import eviction_times, sparse_hybrid


def student(window=8, keys=4, fmap="hedgehog", depth=1, **overrides):
    model = convert_model(tiny_model(**overrides), ConvertConfig(feature_map=fmap, window=window, depth=depth, sparse_cache=keys))
    perturb_new_parameters(model)
    return model


def simulate_cache(score, valid, window, keys):
    """Exact sets E_t of one row and kv head, by running the cache as its definition reads: the
    key leaving the window joins the sparse cache, which then drops its worst (score, position)."""
    T = len(score)
    cache, exact = [], []
    for t in range(T):
        if t - window >= 0 and valid[t - window]:
            cache.append(t - window)
            if len(cache) > keys:
                cache.remove(min(cache, key=lambda s: (score[s], s)))
        exact.append({s for s in range(max(0, t - window + 1), t + 1) if valid[s]} | set(cache))
    return exact


def test_eviction_times_match_the_cache_run_step_by_step():
    gen = torch.Generator().manual_seed(0)
    B, T, Hk, w, M = 2, 40, 3, 5, 4
    score = torch.randn(B, T, Hk, generator=gen)
    score[0, 10:14] = 0.5  # exact ties: broken by position
    valid = torch.rand(B, T, generator=gen) > 0.2
    score = score.masked_fill(~valid[..., None], float("-inf"))
    f = eviction_times(score, torch.arange(T), valid[..., None].expand(B, T, Hk), w, M)
    for b in range(B):
        for h in range(Hk):
            exact = simulate_cache(score[b, :, h].tolist(), valid[b].tolist(), w, M)
            for t in range(T):
                from_f = {s for s in range(t + 1) if valid[b, s] and f[b, s, h] > t}
                assert from_f == exact[t], (b, h, t)


def reference_layer(layer, q, k, v, keys):
    """The module docstring's y_t, written out per query in float64 from the simulated cache."""
    fm = layer.rnn.feature_map
    pq, pk = fm.phi_q(q).double(), fm.phi_k(k).double()
    q, k, v = q.double(), k.double(), v.double()
    B, T, H, D = q.shape
    Hk = k.shape[2]
    G = H // Hk
    y = torch.zeros(B, T, H, D, dtype=torch.float64)
    for b in range(B):
        for hk in range(Hk):
            score = []
            for s in range(T):
                kern = pk[b, :s, hk] @ pk[b, s, hk]  # (s,)
                recalled = (kern @ v[b, :s, hk]) / (kern.sum() + layer.eps)
                score.append(float((v[b, s, hk] - recalled).pow(2).sum()))
            exact = simulate_cache(score, [True] * T, layer.window, keys)
            for h in range(hk * G, (hk + 1) * G):
                g = layer.log_mix[h].double().exp()
                for t in range(T):
                    e_idx = sorted(exact[t])
                    l_idx = [s for s in range(t + 1) if s not in exact[t]]
                    sc = (k[b, e_idx, hk] @ q[b, t, h]) * layer.scaling
                    m = sc.max()
                    num, den = torch.exp(sc - m) @ v[b, e_idx, hk], torch.exp(sc - m).sum()
                    kern = pk[b, l_idx, hk] @ pq[b, t, h]
                    lin_num, lin_den = kern @ v[b, l_idx, hk], kern.sum()
                    y[b, t, h] = (num + g * torch.exp(-m) * lin_num) / (den + g * torch.exp(-m) * lin_den)
    return y


@pytest.mark.parametrize("fmap", ["hedgehog", "elu", "taylor"])
def test_layer_equals_the_definition(fmap):
    model = student(window=4, keys=3, fmap=fmap)
    layer = next(m for m in model.modules() if isinstance(m, LinearAttention))
    gen = torch.Generator().manual_seed(1)
    B, T, H, Hk, D = 1, 30, 4, 2, 16
    q, k, v = torch.randn(B, T, H, D, generator=gen), torch.randn(B, T, Hk, D, generator=gen), torch.randn(B, T, Hk, D, generator=gen)
    with torch.no_grad():
        got = layer.student_attention(q, k, v)
        want = reference_layer(layer, q, k, v, keys=3)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=0)


def test_without_keys_it_is_the_plain_hybrid():
    """The sparse path with M = 0 is the windowed hybrid the model was trained as (also on padding)."""
    model = student(window=4, keys=0)
    layer = next(m for m in model.modules() if isinstance(m, LinearAttention))
    gen = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(2, 23, 4, 16, generator=gen), torch.randn(2, 23, 2, 16, generator=gen), torch.randn(2, 23, 2, 16, generator=gen)
    valid = torch.ones(2, 23, dtype=torch.bool)
    valid[1, :5] = False
    with torch.no_grad():
        plain = layer.student_attention(q, k, v, valid)
        y, *_ = sparse_hybrid(layer, q, k, v, valid, None, None, False)
    torch.testing.assert_close(y[valid], plain[valid], atol=1e-5, rtol=0)


def test_keeping_every_key_is_the_teacher(tokens):
    model = student(window=4, keys=tokens.shape[1])
    with torch.no_grad():
        teacher = model(tokens, use_cache=False, distill_mode="teacher").logits
        got = model(tokens, use_cache=False).logits
        set_sparse_cache(model, 0)
        plain = model(tokens, use_cache=False).logits
    torch.testing.assert_close(got, teacher, atol=1e-5, rtol=0)
    assert (plain - teacher).abs().max() > 1e-2  # the plain hybrid is not the teacher here


LONG = 90  # > window + keys many times over: keys are evicted into the state


@pytest.fixture(scope="module")
def long_tokens():
    return torch.randint(3, VOCAB, (2, LONG), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize(
    "fmap,depth,keys,first",
    [("hedgehog", 1, 4, 37), ("hedgehog", 2, 4, 37), ("hedgehog", 1, 30, 10), ("taylor", 1, 4, 37)],  # 10: shorter than the cache
)
def test_decode_and_chunked_prefill_equal_one_pass(fmap, depth, keys, first, long_tokens):
    """taylor: the carried state has the polynomial scan's layout, read back with φ_k."""
    model = student(depth=depth, keys=keys, fmap=fmap)
    with torch.no_grad():
        full = model(long_tokens, use_cache=False).logits
        stepwise = stepwise_logits(model, long_tokens)
        cache = model.new_cache()
        pieces = ((0, first), (first, first + 1), (first + 1, LONG))
        chunks = [model(long_tokens[:, a:b], cache=cache, use_cache=True).logits for a, b in pieces]
    torch.testing.assert_close(stepwise, full, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-4, rtol=0)


def test_cached_generate_equals_uncached(long_tokens):
    model = student()
    prompt = long_tokens[:1, :60]
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert cached.shape[1] > prompt.shape[1]
        assert torch.equal(cached, greedy_uncached(model, prompt, cached.shape[1] - prompt.shape[1]))


def test_left_padded_batch_equals_one_by_one():
    assert_left_padded_batch_equals_one_by_one(student(window=2, keys=2), max_new_tokens=8)


def test_state_is_constant_in_the_context(long_tokens):
    model = student()
    sizes = []
    with torch.no_grad():
        cache = model.new_cache()
        for t in range(LONG):
            model(long_tokens[:, t : t + 1], cache=cache, use_cache=True)
            sizes.append(cache.nbytes())
    assert len(set(sizes[1:])) == 1


def test_save_load_keeps_the_cache(tmp_path, tokens):
    model = student()
    model.save_pretrained(tmp_path)
    loaded = load_converted(tmp_path)
    assert loaded.distill_config.sparse_cache == 4
    assert all(m.sparse_cache == 4 for m in loaded.modules() if isinstance(m, LinearAttention))
    with torch.no_grad():
        assert torch.equal(loaded(tokens, use_cache=False).logits, model(tokens, use_cache=False).logits)


@pytest.mark.parametrize(
    "cfg,match",
    [
        (dict(window=0, sparse_cache=4), "sparse_cache needs a softmax window"),
        (dict(window=4, decay="fixed", sparse_cache=4), "sparse_cache needs a softmax window"),
        (dict(window=4, recurrence="gla", sparse_cache=4), "sparse_cache needs a softmax window"),
        (dict(window=4, sparse_cache=-1), "sparse_cache must be an integer >= 0"),
    ],
)
def test_bad_sparse_cache_is_one_line(cfg, match):
    with pytest.raises(DistillError, match=match):
        ConvertConfig(**cfg)


def test_a_teacher_takes_no_sparse_cache():
    with pytest.raises(DistillError, match="needs a converted model"):
        set_sparse_cache(tiny_model(), 4)
