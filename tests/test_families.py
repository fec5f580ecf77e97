"""Every supported family (one tiny random config each, tests/conftest.py CONFIGS): the adapter's
facts reproduce the teacher, in the whole model and layer by layer, and the converted model
decodes, generates and saves like any other. ``test_every_architecture_converts`` (test_convert.py)
checks teacher mode against the unconverted model and parallel = recurrent for each family."""
import pytest
import torch
from conftest import CONFIGS, greedy_uncached, perturb_new_parameters, stepwise_logits, tiny_model
from pipeline_tiny import CHARS, TINY_OVERRIDES, tiny_tokenizer, write_text
from transformers.cache_utils import DynamicSlidingWindowLayer

from distill import ConvertConfig, convert_model, load_converted
from distill.architectures import ARCHITECTURES, get_architecture
from distill.errors import DistillError
from distill.layer import LinearAttention
from distill.pipeline.layerwise import attention_input, decoder_layers, embed, position_embeddings, run_layer

FAMILIES = sorted(CONFIGS)
SLIDING = ["gemma2", "gemma3_text"]  # layer 0 slides (window 8), layer 1 is global


def student(arch, **cfg):
    model = convert_model(tiny_model(arch), ConvertConfig(**cfg))
    perturb_new_parameters(model)
    return model


def test_every_family_has_a_tiny_config():
    assert set(CONFIGS) == set(ARCHITECTURES)


@pytest.mark.parametrize("arch", FAMILIES)
def test_cached_generate_equals_uncached(arch, tokens):
    model = student(arch, feature_map="hedgehog", window=4, decay="learned")
    prompt = tokens[:1, :9]
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
        seq = greedy_uncached(model, prompt, cached.shape[1] - prompt.shape[1])  # stops where EOS stopped it
    assert cached.shape[1] > prompt.shape[1] and torch.equal(cached, seq)


@pytest.mark.parametrize("arch", FAMILIES)
def test_save_load_round_trip_is_exact(arch, tmp_path, tokens):
    model = student(arch, feature_map="hedgehog", depth=2, window=4, decay="learned")
    model.save_pretrained(tmp_path)
    again = load_converted(tmp_path)
    before, after = model.state_dict(), again.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(again(tokens, use_cache=False).logits, model(tokens, use_cache=False).logits)


@pytest.mark.parametrize("arch", FAMILIES)
def test_kept_softmax_layer_beside_a_converted_one(arch, tmp_path, tokens):
    teacher = tiny_model(arch)
    with torch.no_grad():
        reference = teacher(tokens, use_cache=False).logits
    model = convert_model(teacher, ConvertConfig(feature_map="elu", window=4, keep_softmax_layers=[0]))
    perturb_new_parameters(model)
    layers = decoder_layers(model)
    assert not isinstance(layers[0].self_attn, LinearAttention) and isinstance(layers[1].self_attn, LinearAttention)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, distill_mode="teacher").logits, reference, atol=1e-5, rtol=0)
        parallel = model(tokens, use_cache=False).logits
        stepwise = stepwise_logits(model, tokens)
    torch.testing.assert_close(stepwise, parallel, atol=1e-4, rtol=0)
    model.save_pretrained(tmp_path)
    again = load_converted(tmp_path)
    before, after = model.state_dict(), again.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():  # the loaded softmax layer runs under the default SDPA, not eager: close, not equal
        torch.testing.assert_close(again(tokens, use_cache=False).logits, parallel, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", SLIDING + ["qwen2"])
def test_sliding_layers_keep(arch, tmp_path, tokens):
    """``sliding_layers: keep`` leaves the teacher's sliding layers as softmax attention with a
    window-bounded KV cache and converts the rest; the choice survives save/load."""
    qwen2 = {"use_sliding_window": True, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}
    overrides = {} if arch in SLIDING else qwen2
    model = convert_model(tiny_model(arch, **overrides), ConvertConfig(feature_map="elu", window=4, sliding_layers="keep"))
    perturb_new_parameters(model)
    layers = decoder_layers(model)
    assert not isinstance(layers[0].self_attn, LinearAttention) and isinstance(layers[1].self_attn, LinearAttention)
    with torch.no_grad():
        parallel = model(tokens, use_cache=False).logits
        cache = model.new_cache()
        stepwise = stepwise_logits(model, tokens, cache=cache)
    torch.testing.assert_close(stepwise, parallel, atol=1e-4, rtol=0)
    assert isinstance(cache.layers[0], DynamicSlidingWindowLayer)
    assert cache.layers[0].keys.shape[2] < 8 < tokens.shape[1]  # bounded by the window, not the context
    model.save_pretrained(tmp_path)
    again = load_converted(tmp_path)
    assert again.distill_config.sliding_layers == "keep" and again.distill_config.keep_softmax_layers == []
    assert not isinstance(decoder_layers(again)[0].self_attn, LinearAttention)
    with torch.no_grad():
        torch.testing.assert_close(again(tokens, use_cache=False).logits, parallel, atol=1e-5, rtol=0)


def test_sliding_layers_is_checked():
    with pytest.raises(DistillError, match="sliding_layers must be one of convert, keep"):
        ConvertConfig(sliding_layers="drop")


# ---- layer by layer, as the fit and transfer stages run it -------------------------------------


def teacher_activations(teacher, tokens):
    """Per layer: the hidden states entering it and its attention's output, from the unconverted
    model (eager attention), plus the final normalised hidden states."""
    arch = get_architecture(teacher.config.model_type)
    inputs, outputs, hooks = {}, {}, []
    for i, layer in enumerate(arch.decoder_layers(teacher)):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, kw, i=i: inputs.__setitem__(i, (a[0] if a else kw["hidden_states"])), with_kwargs=True))
        hooks.append(layer.self_attn.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out[0])))
    final = {}
    hooks.append(arch.final_norm(teacher).register_forward_hook(lambda m, a, out: final.__setitem__("h", out)))
    with torch.no_grad():
        teacher(tokens, use_cache=False)
    for h in hooks:
        h.remove()
    return inputs, outputs, final["h"]


def layerwise_attention(model, i, hidden):
    """Layer i's teacher attention output [B,T,hidden] through the transfer stage's path."""
    attn = decoder_layers(model)[i].self_attn
    x = attention_input(model, i, hidden)
    q, k, v = attn.project(x, position_embeddings(model, x))
    y = attn.teacher_attention(q, k, v)  # (B, T, H, D)
    return attn.o_proj(y.reshape(*y.shape[:2], -1))


@pytest.mark.parametrize("arch", FAMILIES)
def test_layerwise_path_reproduces_the_teacher(arch, tokens):
    """embed -> run_layer (teacher mode) -> final norm, and each layer's attention through
    attention_input/position_embeddings/project, equal the unconverted model's activations; with
    layer 0 kept as softmax so that run_layer also builds a kept layer's mask."""
    teacher = tiny_model(arch)
    inputs, outputs, final = teacher_activations(teacher, tokens)
    with torch.no_grad():
        reference_logits = teacher(tokens, use_cache=False).logits
    model = convert_model(teacher, ConvertConfig(feature_map="elu", window=4, keep_softmax_layers=[0]))
    with torch.no_grad():
        torch.testing.assert_close(layerwise_attention(model, 1, inputs[1]), outputs[1], atol=1e-5, rtol=0)
        hidden = embed(model, tokens, batch=1)
        torch.testing.assert_close(hidden, inputs[0], atol=1e-6, rtol=0)
        for i in range(len(decoder_layers(model))):
            hidden = run_layer(model, i, hidden, "teacher", batch=1)
        logits = get_architecture(arch).logits(model, hidden)  # with the family's logit scaling or capping
        hidden = get_architecture(arch).final_norm(model)(hidden)
    torch.testing.assert_close(hidden, final, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, reference_logits, atol=1e-5, rtol=0)


FACTS = [  # (family, layer, attribute of its LinearAttention, a wrong value): each must matter
    ("gemma2", 0, "softcap", None),
    ("gemma2", 0, "teacher_sliding_window", None),
    ("gemma3_text", 0, "rope_key", "full_attention"),
    ("gemma3_text", 0, "teacher_sliding_window", None),
    ("granite", 0, "scaling", 16**-0.5),
    ("smollm3", 1, "use_rope", True),
]


@pytest.mark.parametrize("arch,index,name,wrong", FACTS)
def test_each_fact_is_exercised(arch, index, name, wrong, tokens):
    """The tiny configs reach every fact: giving a layer a wrong one breaks the reproduction."""
    teacher = tiny_model(arch)
    inputs, outputs, _ = teacher_activations(teacher, tokens)
    model = convert_model(teacher, ConvertConfig(feature_map="elu"))
    attn = decoder_layers(model)[index].self_attn
    with torch.no_grad():
        torch.testing.assert_close(layerwise_attention(model, index, inputs[index]), outputs[index], atol=1e-5, rtol=0)
        setattr(attn, name, wrong)
        assert (layerwise_attention(model, index, inputs[index]) - outputs[index]).abs().max() > 1e-3


def test_fused_qkv_is_shared_not_split():
    teacher = tiny_model("phi3")
    qkv = teacher.model.layers[0].self_attn.qkv_proj.weight
    model = convert_model(teacher, ConvertConfig())
    attn = model.model.layers[0].self_attn
    assert attn.qkv_proj.weight is qkv and not hasattr(attn, "q_proj")


def test_a_layer_without_what_the_adapter_reads_is_refused():
    teacher = tiny_model("qwen3")
    del teacher.model.layers[1].self_attn.k_norm
    with pytest.raises(DistillError, match="layer 1 attention .* has no k_norm"):
        convert_model(teacher, ConvertConfig())
    assert teacher.config.model_type == "qwen3"


def test_gemma2_runs_through_the_pipeline(tmp_path):
    """fit, transfer and finetune (layer-wise, on a Gemma 2 teacher with a soft-capped sliding
    layer) produce a model that loads strictly and decodes as it runs in parallel."""
    from distill.pipeline.run import run_convert
    from distill.pipeline.run_config import load_run_config

    teacher = tiny_model("gemma2", vocab_size=len(CHARS) + 2, pad_token_id=1, bos_token_id=1)
    teacher.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    data = write_text(tmp_path / "text.txt")
    overrides = TINY_OVERRIDES + [
        f"data={data}", "model.feature_map=hedgehog", "model.window=4",
        "finetune.enabled=true", "finetune.steps=2", "finetune.lora_rank=2", "finetune.crop=16",
    ]
    run_convert(str(tmp_path / "model"), tmp_path / "run", load_run_config(None, overrides))
    model = load_converted(tmp_path / "run")
    ids = torch.randint(3, len(CHARS) + 2, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        parallel = model(ids, use_cache=False).logits
        stepwise = stepwise_logits(model, ids)
    assert torch.isfinite(parallel).all()
    torch.testing.assert_close(stepwise, parallel, atol=1e-4, rtol=0)


def test_lora_targets_the_family_lacks_are_refused():
    """Phi-3's fused qkv_proj: the default q/k/v/o targets would adapt o_proj alone."""
    from distill.pipeline.finetune import check_targets

    with pytest.raises(DistillError, match="finetune.targets names q_proj, k_proj, v_proj, which this model does not have"):
        check_targets(tiny_model("phi3"), ["q_proj", "k_proj", "v_proj", "o_proj"])
    check_targets(tiny_model("phi3"), ["qkv_proj", "o_proj"])
    check_targets(tiny_model("llama"), ["q_proj", "k_proj", "v_proj", "o_proj"])
