"""``linear_rope: false``: the feature maps read q and k before RoPE, so the student depends on
relative positions only (as its teacher does), in every form: parallel, chunked, step by step,
generate, left-padded batches, save/load, and through fit and transfer."""
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
from distill.layer import LinearAttention, apply_rope
from distill.pipeline.layerwise import attention_input, embed, position_embeddings

T = 90  # past the scans' 64-token chunk
VARIANTS = {
    "pure": dict(window=0),
    "hybrid": dict(window=8),
    "hybrid, depth 2": dict(window=8, depth=2),
    "sparse cache": dict(window=8, sparse_cache=4),
    "gla, pure": dict(window=0, recurrence="gla"),
    "gated_delta hybrid": dict(window=8, recurrence="gated_delta", decay="learned"),
}


def student(linear_rope=False, **cfg):
    model = convert_model(tiny_model(max_position_embeddings=512), ConvertConfig(feature_map="hedgehog", linear_rope=linear_rope, **cfg))
    perturb_new_parameters(model)
    return model


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, VOCAB, (2, T), generator=torch.Generator().manual_seed(11))


def at_offset(model, ids, offset, mode="parallel"):
    positions = torch.arange(offset, offset + ids.shape[1])[None].expand(len(ids), -1)
    with torch.no_grad():
        return model(ids, position_ids=positions, use_cache=False, distill_mode=mode).logits


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_student_reads_relative_positions_only(variant, ids):
    """Moving every position by 300 leaves the logits as they are, as it leaves the teacher's;
    with the feature maps after RoPE (the default) it does not."""
    model = student(**VARIANTS[variant])
    torch.testing.assert_close(at_offset(model, ids, 300, "teacher"), at_offset(model, ids, 0, "teacher"), atol=1e-4, rtol=0)
    torch.testing.assert_close(at_offset(model, ids, 300), at_offset(model, ids, 0), atol=1e-4, rtol=0)
    rotated = student(linear_rope=True, **VARIANTS[variant])
    assert not torch.allclose(at_offset(rotated, ids, 300), at_offset(rotated, ids, 0), atol=1e-3)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_decode_and_chunked_prefill_equal_one_pass(variant, ids):
    model = student(**VARIANTS[variant])
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        stepwise = stepwise_logits(model, ids)
        cache = model.new_cache()
        chunks = [model(ids[:, a:b], cache=cache, use_cache=True).logits for a, b in ((0, 37), (37, 38), (38, T))]
    torch.testing.assert_close(stepwise, full, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["hybrid", "sparse cache"])
def test_generate_padding_and_save_load(variant, ids, tmp_path):
    model = student(**VARIANTS[variant])
    prompt = ids[:1, :40]
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert cached.shape[1] > prompt.shape[1]
        assert torch.equal(cached, greedy_uncached(model, prompt, cached.shape[1] - prompt.shape[1]))
    assert_left_padded_batch_equals_one_by_one(model, max_new_tokens=6)
    model.save_pretrained(tmp_path)
    loaded = load_converted(tmp_path)
    assert loaded.distill_config.linear_rope is False
    with torch.no_grad():
        assert torch.equal(loaded(ids, use_cache=False).logits, model(ids, use_cache=False).logits)


def test_the_cache_keeps_its_keys_as_the_feature_maps_read_them(ids):
    """The extra keys are the window's and the sparse slots' (w + M per kv head), and the state
    stays constant in the context."""
    sizes = {}
    for linear_rope in (True, False):
        model = student(linear_rope=linear_rope, **VARIANTS["sparse cache"])
        cache, seen = model.new_cache(), []
        with torch.no_grad():
            for t in range(T):
                model(ids[:, t : t + 1], cache=cache, use_cache=True)
                seen.append(cache.nbytes())
        assert len(set(seen[20:])) == 1
        sizes[linear_rope] = seen[-1]
    cfg = model.config
    extra = cfg.num_hidden_layers * 2 * (8 + 4) * cfg.num_key_value_heads * cfg.head_dim * 4  # B=2, fp32
    assert sizes[False] - sizes[True] == extra


def test_feature_inputs_are_q_and_k_before_rope():
    model = student(window=8)
    attn = model.model.layers[0].self_attn
    x = attention_input(model, 0, embed(model, torch.randint(3, VOCAB, (2, 12)), 2))
    rope = position_embeddings(model, x[:1], 50)
    q, k, _ = attn.project(x, rope)
    qf, kf = attn.feature_inputs(q, k, rope)
    B, L, _ = x.shape
    torch.testing.assert_close(qf, attn.q_proj(x).view(B, L, -1, attn.head_dim), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kf, attn.k_proj(x).view(B, L, -1, attn.head_dim), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(apply_rope(qf, *rope), q, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="linear_rope: false"):
        attn.student_attention(q, k, _)


def test_bad_linear_rope_is_one_line():
    with pytest.raises(DistillError, match="linear_rope must be true or false"):
        ConvertConfig(linear_rope="no")


def test_fit_and_transfer_train_a_student_that_reads_relative_positions(ids):
    """The fit stage fits φ on the pre-RoPE q/k against the teacher's (rotated) scores; transfer
    trains it: both lower their errors, and the trained student is still shift-free."""
    from pipeline_tiny import MemoryStore, NoBar

    from distill.pipeline.data import TokenData
    from distill.pipeline.fit import run_fit
    from distill.pipeline.params import converted_layers, new_parameters
    from distill.pipeline.run_config import FitConfig, TransferConfig
    from distill.pipeline.train import StageContext
    from distill.pipeline.transfer import run_transfer

    model = convert_model(tiny_model(max_position_embeddings=512), ConvertConfig(feature_map="hedgehog", window=4, linear_rope=False))
    model.requires_grad_(False)
    for i in converted_layers(model):
        for p in new_parameters(model.model.layers[i].self_attn).values():
            p.requires_grad_(True)
    data = TokenData(train=ids[:, :48].repeat(2, 1), heldout=ids[:, 42:90])
    ctx = StageContext(seed=0, store=MemoryStore(), progress=NoBar)
    fit = run_fit(model, data, FitConfig(sequences=2), ctx)
    assert all(r.attn_kl <= r.attn_kl_init for r in fit)
    results = run_transfer(model, data, TransferConfig(steps=20, lr=0.02), ctx)
    assert all(r.transfer_mse_after < r.transfer_mse_before for r in results)
    torch.testing.assert_close(at_offset(model, ids, 200), at_offset(model, ids, 0), atol=1e-4, rtol=0)
