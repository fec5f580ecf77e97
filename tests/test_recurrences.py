"""Gated and delta-rule recurrences inside converted models: both forms, the cache, generate(),
padding, save/load, and what a fresh gated sublayer equals."""
import itertools

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
from distill.errors import DistillError
from distill.recurrence import RECURRENCES

RECURRENCE_NAMES = sorted(RECURRENCES)  # every registered recurrence joins the grid
T = 300  # past the 64-token scan chunk and the 256-query block of the windowed softmax
GRID = list(itertools.product(RECURRENCE_NAMES, [1, 2], [0, 64]))


@pytest.fixture(scope="module")
def long_tokens():
    return torch.randint(3, VOCAB, (2, T), generator=torch.Generator().manual_seed(5))


def student(recurrence, depth=1, window=0, perturb=True, **cfg):
    teacher = tiny_model(max_position_embeddings=512)
    model = convert_model(teacher, ConvertConfig(feature_map="hedgehog", recurrence=recurrence, depth=depth, window=window, **cfg))
    if perturb:
        perturb_new_parameters(model)
        for module in model.modules():  # perturbed gates must stay valid, as training keeps them
            if hasattr(module, "constrain_"):
                module.constrain_()
    return model


def test_the_grid_covers_the_builtins():
    assert {"linear", "gla", "liger", "delta", "gated_delta"} <= set(RECURRENCE_NAMES)


@pytest.mark.parametrize("recurrence,depth,window", GRID)
def test_parallel_equals_recurrent(recurrence, depth, window, long_tokens):
    model = student(recurrence, depth, window, decay="fixed")
    with torch.no_grad():
        parallel = model(long_tokens, use_cache=False, distill_mode="parallel").logits
        recurrent = stepwise_logits(model, long_tokens)
    torch.testing.assert_close(recurrent, parallel, atol=1e-4, rtol=0)


@pytest.mark.parametrize("recurrence,window", list(itertools.product(RECURRENCE_NAMES, [0, 64])))
def test_prefill_decode_and_cached_generate(recurrence, window, long_tokens):
    model = student(recurrence, 2, window)
    with torch.no_grad():
        full = model(long_tokens, use_cache=False).logits
        cache = model.new_cache()
        pieces = [model(long_tokens[:, a:b], cache=cache, use_cache=True).logits for a, b in ((0, 270), (270, 295))]
        pieces += [model(long_tokens[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(295, T)]
        torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-4, rtol=0)
        prompt = long_tokens[:1, :280]
        cached = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        seq = greedy_uncached(model, prompt, cached.shape[1] - prompt.shape[1])
    assert cached.shape[1] > prompt.shape[1] and torch.equal(cached, seq)


@pytest.mark.parametrize("recurrence,window", list(itertools.product(RECURRENCE_NAMES, [0, 4])))
def test_left_padded_batch_equals_one_by_one(recurrence, window):
    assert_left_padded_batch_equals_one_by_one(student(recurrence, 2, window, decay="learned"), max_new_tokens=6)


@pytest.mark.parametrize("gated,plain", [("gla", "linear"), ("liger", "linear"), ("gated_delta", "delta")])
@pytest.mark.parametrize("window", [0, 8])
def test_a_fresh_gated_sublayer_equals_its_ungated_form(gated, plain, window, long_tokens):
    """Gate strengths start at 0, so a fresh gated layer computes exactly its ungated form (the
    other new parameters are set equal in both)."""
    a, b = student(gated, 2, window, perturb=False), student(plain, 2, window, perturb=False)
    shared = b.state_dict()
    a.load_state_dict({k: v for k, v in shared.items()}, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(a(long_tokens, use_cache=False).logits, b(long_tokens, use_cache=False).logits, atol=2e-5, rtol=0)


@pytest.mark.parametrize("recurrence", RECURRENCE_NAMES)
def test_save_load_round_trip_is_exact(recurrence, tmp_path, long_tokens):
    model = student(recurrence, 2, 8, decay="learned")
    model.save_pretrained(tmp_path)
    again = load_converted(tmp_path)
    before, after = model.state_dict(), again.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(again(long_tokens[:, :40], use_cache=False).logits, model(long_tokens[:, :40], use_cache=False).logits)
    assert again.distill_config.recurrence == recurrence


def test_gates_and_decays_stay_float32_in_bf16(long_tokens):
    model = student("gated_delta", 1, 0, decay="fixed").to(torch.bfloat16)
    rnn = model.model.layers[0].self_attn.rnn
    assert rnn.recurrence.gate_strength.dtype == torch.float32 and rnn.fixed_log_decay.dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(model(long_tokens[:, :50], use_cache=False).logits.float()).all()


def test_unknown_recurrence_is_one_line_and_leaves_the_model_untouched():
    teacher = tiny_model()
    before = type(teacher.model.layers[0].self_attn)
    with pytest.raises(DistillError, match="unknown recurrence 'nope'; registered: delta, gated_delta, gla, liger, linear"):
        convert_model(teacher, ConvertConfig(recurrence="nope"))
    assert type(teacher.model.layers[0].self_attn) is before
    with pytest.raises(DistillError, match="does not take"):
        convert_model(teacher, ConvertConfig(recurrence="delta", recurrence_kwargs={"gate_rank": 4}))


def test_attention_cross_entropy_needs_the_linear_recurrence():
    from distill.pipeline.run_config import load_run_config

    with pytest.raises(DistillError, match="transfer.xent_weight needs model.recurrence=linear"):
        load_run_config(None, ["model.recurrence=gla", "transfer.xent_weight=0.1"])


@pytest.mark.parametrize("recurrence", RECURRENCE_NAMES)
def test_masked_tokens_leave_the_state_unchanged(recurrence):
    """Tokens marked invalid anywhere in the sequence change neither the state nor the outputs
    of the valid tokens: equal to scanning the valid tokens alone (gates, β and values masked).
    ``linear`` runs without decay here: its per-head decay ages the state at every position (only
    left padding reaches it in generate(), while the state is still empty); the data-dependent
    recurrences fold the decay into their masked gates."""
    model = student(recurrence, 1, 0, decay="none" if recurrence == "linear" else "learned")
    rnn = model.model.layers[0].self_attn.rnn
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 150, 4, 16, generator=g), torch.randn(1, 150, 2, 16, generator=g), torch.randn(1, 150, 2, 16, generator=g)
    valid = torch.ones(1, 150, dtype=torch.bool)
    valid[0, 40:47] = valid[0, 70] = valid[0, 149] = False
    with torch.no_grad():
        o, state = rnn.scan(q, k, v, valid, None, recurrent=False)
        keep = valid[0]
        o_ref, state_ref = rnn.scan(q[:, keep], k[:, keep], v[:, keep], None, None, recurrent=False)
    torch.testing.assert_close(o[:, keep], o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, state_ref, atol=1e-5, rtol=1e-5)


def test_liger_gate_reads_the_key_and_ignores_its_rotary_position():
    """Liger's gate has no projection: it is a function of the key alone, and the same key rotated
    by RoPE to another position gives the same gate."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from distill.layer import apply_rope
    from distill.recurrence import RECURRENCES

    torch.manual_seed(0)
    gate = RECURRENCES["liger"](head_dim=16, num_kv_heads=2, feature_dim=12)
    with torch.no_grad():
        gate.gate_strength.uniform_(0.5, 2.0)
    assert [n for n, _ in gate.named_parameters()] == ["gate_strength"]
    k = torch.randn(1, 1, 2, 16).expand(1, 40, 2, 16)  # one key at 40 positions
    cos, sin = LlamaRotaryEmbedding(LlamaConfig(head_dim=16, hidden_size=64, num_attention_heads=4))(k, torch.arange(40)[None])
    rotated = apply_rope(k, cos, sin)
    assert not torch.allclose(rotated[:, 0], rotated[:, 39])
    log_alpha = gate.log_alpha(rotated, None, None, None)  # (1, 40, 2, 12)
    torch.testing.assert_close(log_alpha, log_alpha[:, :1].expand_as(log_alpha), atol=1e-5, rtol=0)
    assert (log_alpha < 0).all()
    other = gate.log_alpha(torch.randn(1, 1, 2, 16), None, None, None)
    assert not torch.allclose(other, log_alpha[:, :1], atol=1e-3)


@pytest.mark.parametrize("recurrence,decay", [("delta", "none"), ("delta", "fixed"), ("gated_delta", "learned")])
def test_delta_rules_weigh_their_value_estimate_by_the_key_mass(recurrence, decay):
    """A delta rule's readout is (estimate · mass, mass): the estimate is S_tᵀq̂_t of the delta rule
    and the mass φ(q_t)·z_t, z_t = α_t z_{t−1} + φ(k_t), what ``linear`` would normalise by over
    the same keys and decay (written out here in float64; padding adds nothing)."""
    import torch.nn.functional as F

    from distill_kernels.delta import naive_delta_rule

    model = student(recurrence, 1, 0, decay=decay)
    rnn = model.model.layers[0].self_attn.rnn
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(1, 90, 4, 16, generator=g), torch.randn(1, 90, 2, 16, generator=g), torch.randn(1, 90, 2, 16, generator=g)
    valid = torch.ones(1, 90, dtype=torch.bool)
    valid[0, :5] = valid[0, 50] = False
    with torch.no_grad():
        o, state = rnn.scan(q, k, v, valid, None, recurrent=False)
        pq, pk = rnn.feature_map.phi_q(q).double(), rnn.feature_map.phi_k(k).double()  # (1, T, 4, F), (1, T, 2, F)
        log_alpha = rnn.recurrence.log_alpha(v, valid, rnn.log_decay())
        log_alpha = torch.zeros(1, 90, 2) if log_alpha is None else log_alpha
        z, mass = torch.zeros(2, pk.shape[-1], dtype=torch.float64), []
        for t in range(90):
            z = log_alpha[0, t].double().exp()[:, None] * z + pk[0, t] * valid[0, t]
            mass.append((pq[0, t] * z.repeat_interleave(2, dim=0)).sum(-1))  # (4,)
        mass = torch.stack(mass)[None]  # (1, T, 4)
        estimate, _ = naive_delta_rule(
            F.normalize(pq, dim=-1), F.normalize(pk, dim=-1), v.double(), rnn.recurrence.beta(v, valid).double(), log_alpha.double()
        )
    assert mass[0, 10:].min() > 0.1  # a scale the estimate really is weighed by
    torch.testing.assert_close(o[..., -1].double(), mass, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(o[..., :-1].double(), estimate * mass[..., None], rtol=1e-4, atol=1e-5)
    assert state.shape[-1] == 16 + 1  # the delta rule's S, then z
