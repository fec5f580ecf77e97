"""Swap a causal LM's softmax attention for linear-RNN layers, and save/load the result.

Converted models get a per-architecture subclass (``DistillLlamaForCausalLM`` with model_type
``distill_llama``, ...) registered with the Auto classes, so that ``save_pretrained`` writes a
normal Hugging Face folder and ``AutoModelForCausalLM.from_pretrained`` (after ``import distill``)
or :func:`load_converted` rebuilds exactly the same model, strictly, without remote code.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.cache_utils import DynamicSlidingWindowLayer
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .architectures import ARCHITECTURES, PREFIX, base_model_type, get_architecture
from .cache import RecurrentCache
from .config import ConvertConfig
from .errors import DistillError
from .files import atomic_write_text
from .feature_maps import check_feature_map
from .layer import SHARED_MODULES, LinearAttention
from .recurrence import check_recurrence
from .rnn import RNNSpec

log = logging.getLogger(__name__)

_CLASSES: dict[str, tuple[type, type]] = {}

REMOTE_MODULE = "modeling_distill"
REMOTE_CODE = '''"""Loads this converted folder with the installed distill package (no code of its own)."""
from distill.convert import distill_classes

DistillConfig, DistillForCausalLM = distill_classes("{model_type}")
'''


class DistillMixin:
    """Behaviour shared by every converted causal LM (mixed in before the teacher's class)."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        cfg = ConvertConfig.from_dict(config.distill)
        _swap_attention(self, cfg, _layer_spec(self, cfg))

    @property
    def distill_config(self) -> ConvertConfig:
        return ConvertConfig.from_dict(self.config.distill)

    def new_cache(self) -> RecurrentCache:
        """Recurrent states for converted layers; a KV cache for softmax ones, holding only the
        last window of keys where the teacher's layer slides (as the teacher's own cache does)."""
        arch = get_architecture(self.config.model_type)
        layers = arch.decoder_layers(self)
        cache = RecurrentCache([isinstance(layer.self_attn, LinearAttention) for layer in layers])
        for i, layer in enumerate(layers):
            window = arch.teacher_sliding_window(self.config, i)
            if window and not isinstance(layer.self_attn, LinearAttention):
                cache.layers[i] = DynamicSlidingWindowLayer(sliding_window=window)
        return cache

    def forward(
        self, input_ids=None, attention_mask=None, position_ids=None, cache=None, use_cache=None, distill_mode=None, **kwargs
    ):
        """As the teacher's forward, plus ``distill_mode`` (auto | parallel | recurrent | teacher)."""
        if "past_key_values" in kwargs:  # transformers' deprecated spelling
            cache = kwargs.pop("past_key_values")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if distill_mode == "teacher":
            use_cache = False
        if use_cache and cache is None:
            cache = self.new_cache()
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            distill_mode=distill_mode,
            distill_padding_mask=attention_mask,
            **kwargs,
        )

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if model_kwargs.get("cache") is None and generation_config.use_cache is not False:
            model_kwargs["cache"] = self.new_cache()
            return
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, tokenizer=None, **kwargs):
        """Hugging Face ``save_pretrained`` (safetensors), plus the tokenizer when one is given, and
        a two-line ``modeling_distill.py`` named in ``auto_map`` that imports the installed distill
        package, so that tools which only know ``trust_remote_code=True`` (the lm_eval command line)
        load the folder too. No code is copied; after ``import distill.convert`` no remote code runs."""
        self.config.auto_map = {"AutoConfig": f"{REMOTE_MODULE}.DistillConfig", "AutoModelForCausalLM": f"{REMOTE_MODULE}.DistillForCausalLM"}
        super().save_pretrained(save_directory, *args, **kwargs)
        atomic_write_text(Path(save_directory) / f"{REMOTE_MODULE}.py", REMOTE_CODE.format(model_type=self.config.model_type))
        if tokenizer is not None:
            tokenizer.save_pretrained(save_directory)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Strict: any missing, unexpected or mis-shaped weight is an error."""
        want_info = kwargs.pop("output_loading_info", False)
        kwargs.setdefault("use_safetensors", True)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = [
            f"{what}: {', '.join(sorted(str(k) for k in info.get(key) or ())[:5])}"
            for key, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"), ("mismatched_keys", "wrong shape"))
            if info.get(key)
        ]
        if problems:
            raise DistillError(
                f"checkpoint does not match its converted architecture ({'; '.join(problems)}); "
                "re-create it with distill convert or save_pretrained"
            )
        return (model, info) if want_info else model


def distill_classes(model_type: str) -> tuple[type, type]:
    """(config class, causal-LM class) for a converted ``model_type``; registered once."""
    base = base_model_type(model_type)
    get_architecture(base)
    if base not in _CLASSES:
        config_base = CONFIG_MAPPING[base]
        model_base = MODEL_FOR_CAUSAL_LM_MAPPING[config_base]
        config_cls = type(f"Distill{config_base.__name__}", (config_base,), {"model_type": PREFIX + base, "__module__": __name__})
        model_cls = type(
            f"Distill{model_base.__name__}", (DistillMixin, model_base), {"config_class": config_cls, "__module__": __name__}
        )
        AutoConfig.register(PREFIX + base, config_cls)
        AutoModelForCausalLM.register(config_cls, model_cls)
        _CLASSES[base] = (config_cls, model_cls)
    return _CLASSES[base]


def register_all() -> None:
    for model_type in ARCHITECTURES:
        distill_classes(model_type)


def check_convertible(model: nn.Module, cfg: ConvertConfig) -> RNNSpec:
    """Raise a one-line :class:`DistillError` unless ``cfg`` can convert ``model`` (a supported,
    not yet converted causal LM; valid layer indices; a feature map that fits its head size).
    Touches nothing; returns the checked sublayer spec."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise DistillError("convert_model needs a transformers causal LM (a model with .config.model_type)")
    if model_type.startswith(PREFIX):
        raise DistillError("this model is already converted; start again from its teacher")
    return _layer_spec(model, cfg)


def _layer_spec(model: nn.Module, cfg: ConvertConfig) -> RNNSpec:
    arch = get_architecture(model.config.model_type)
    layers = arch.decoder_layers(model)
    bad = [i for i in cfg.keep_softmax_layers if not 0 <= i < len(layers)]
    if bad:
        raise DistillError(
            f"keep_softmax_layers has index {bad[0]} but the model has {len(layers)} layers (0..{len(layers) - 1})"
        )
    arch.check(model.config, layers)
    head_dim = layers[0].self_attn.head_dim
    map_cls = check_feature_map(cfg.feature_map, cfg.feature_map_kwargs, head_dim)
    recurrence_cls = check_recurrence(cfg.recurrence, cfg.recurrence_kwargs)
    return RNNSpec(map_cls, dict(cfg.feature_map_kwargs), cfg.decay, recurrence_cls, dict(cfg.recurrence_kwargs))


def softmax_layers(model: nn.Module, cfg: ConvertConfig) -> list[int]:
    """Layers that keep the teacher's softmax attention: ``keep_softmax_layers``, plus the
    teacher's sliding-window layers (already O(window) per token) when ``sliding_layers: keep``."""
    arch = get_architecture(model.config.model_type)
    kept = set(cfg.keep_softmax_layers)
    if cfg.sliding_layers == "keep":
        count = len(arch.decoder_layers(model))
        kept |= {i for i in range(count) if arch.teacher_sliding_window(model.config, i)}
    return sorted(kept)


def _build_replacements(model: nn.Module, cfg: ConvertConfig, spec: RNNSpec) -> dict[int, LinearAttention]:
    """Build the new modules (``cfg`` already checked) without touching ``model``."""
    arch = get_architecture(model.config.model_type)
    config = model.config
    layers = arch.decoder_layers(model)
    kept = set(softmax_layers(model, cfg))
    built = {}
    for i, layer in enumerate(layers):
        if i in kept:
            continue
        attn = layer.self_attn
        module = LinearAttention(
            attn,
            i,
            spec,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            depth=cfg.depth,
            window=cfg.window,
            eps=cfg.eps,
            sparse_cache=cfg.sparse_cache,
            linear_rope=cfg.linear_rope,
            **arch.layer_options(config, i),
        )
        ref = attn.o_proj.weight
        built[i] = module.to(device=ref.device, dtype=ref.dtype)
    return built


def _swap_attention(model: nn.Module, cfg: ConvertConfig, spec: RNNSpec) -> int:
    """Replace the attention modules named by ``cfg``; returns how many were converted."""
    layers = get_architecture(model.config.model_type).decoder_layers(model)
    built = _build_replacements(model, cfg, spec)  # built in full before anything is swapped
    for i, module in built.items():
        layers[i].self_attn = module
    return len(built)


def convert_model(model: nn.Module, config: ConvertConfig | dict[str, Any] | None = None) -> nn.Module:
    """Replace softmax attention in ``model`` in place and return it.

    Everything is validated and built before the first module is swapped, so a failure leaves
    ``model`` unchanged (like peft). Teacher weights are shared, not copied.
    """
    cfg = config if isinstance(config, ConvertConfig) else ConvertConfig.from_dict(config or {})
    spec = check_convertible(model, cfg)
    model_type = model.config.model_type
    config_cls, model_cls = distill_classes(model_type)
    converted = _swap_attention(model, cfg, spec)
    model.config.__class__ = config_cls
    model.config.distill = cfg.to_dict()
    model.__class__ = model_cls
    total = len(get_architecture(model_type).decoder_layers(model))
    log.info("converted %d of %d attention layers (%s)", converted, total, cfg.feature_map)
    return model


def restore_softmax(model: nn.Module, indices: list[int]) -> None:
    """Give the converted layers ``indices`` of a converted model their teacher's softmax attention
    back (a new module of the teacher's class over the same shared weights) and record them in
    ``keep_softmax_layers``, so that save/load rebuilds the same mix."""
    layers = get_architecture(model.config.model_type).decoder_layers(model)
    for i in indices:
        student = layers[i].self_attn
        if not isinstance(student, LinearAttention):
            raise DistillError(f"layer {i} is not a converted layer; nothing to restore")
        attn = student.teacher_class(model.config, i)
        for name in SHARED_MODULES:
            if hasattr(student, name):
                setattr(attn, name, getattr(student, name))
        layers[i].self_attn = attn.to(device=student.o_proj.weight.device)
    cfg = ConvertConfig.from_dict(model.config.distill)
    cfg.keep_softmax_layers = sorted(set(cfg.keep_softmax_layers) | set(indices))
    model.config.distill = cfg.to_dict()


def set_sparse_cache(model: nn.Module, keys: int) -> None:
    """Switch the sparse global cache of every converted layer to ``keys`` per kv head (0 = off)
    and record it in the model's config, so that save/load keeps it. Training-free: any converted
    hybrid of the linear recurrence without decay takes it."""
    if not isinstance(getattr(model.config, "distill", None), dict):
        raise DistillError("a sparse cache needs a converted model (distill convert's output), not a teacher")
    cfg = ConvertConfig.from_dict({**model.config.distill, "sparse_cache": keys})  # checks it
    for module in model.modules():
        if isinstance(module, LinearAttention):
            module.sparse_cache = keys
    model.config.distill = cfg.to_dict()


def is_converted(path: str | Path) -> bool:
    """Whether ``path`` holds a folder written from a converted model (its model_type says so)."""
    config = Path(path) / "config.json"
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type", "")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(model_type, str) and model_type.startswith(PREFIX)


def load_converted(path: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None):
    """Load a converted model folder written by ``save_pretrained`` or ``distill convert``."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise DistillError(f"{path} is not a model folder (no config.json); give the --out folder of distill convert")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise DistillError(f"cannot read {path / 'config.json'} ({str(err).splitlines()[0]}); is the folder complete?") from None
    if not config.model_type.startswith(PREFIX):
        raise DistillError(f"{path} holds a {config.model_type!r} model, not a converted one; run distill convert on it")
    _, model_cls = distill_classes(config.model_type)
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = model_cls.from_pretrained(path, **kwargs)
    except DistillError:
        raise
    except (OSError, RuntimeError, ValueError, SafetensorError) as err:
        raise DistillError(f"cannot load weights from {path} ({str(err).splitlines()[0]}); the checkpoint may be corrupt") from None
    return model.to(device) if device is not None else model
register_all()  # importing this module makes AutoModelForCausalLM load converted folders
