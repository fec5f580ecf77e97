"""The ``distill convert`` run config: one dataclass per stage, read from YAML plus ``key=value``.

Precedence: the YAML file, then the overrides (dotted keys reach into sections:
``transfer.steps=200``, ``model.window=64``, ``model.feature_map_kwargs.rank=16``), then
validation. Unknown keys are errors, as in :func:`distill.config.check_keys`.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import DTYPES, ConvertConfig, check_keys, parse_value
from ..errors import DistillError

TRANSFER_INPUTS = ("teacher", "student")


@dataclass
class FitConfig:
    """Stage 1: fit the feature maps to the teacher's scores, before any gradient step.

    enabled: run this stage.
    sequences: calibration sequences whose q/k are collected per layer.
    queries: queries per sequence (evenly spaced) used for fitting and for the attention KL.
    uniform_weight: the least-squares weight of a (query, key) pair is its teacher softmax weight
        plus ``uniform_weight`` / (keys the query sees); > 0 keeps low scores from stealing mass.
    grid: points on which the polynomial is constrained to stay positive.
    margin: the fitted polynomial stays above margin × its value at the largest observed score,
        which keeps the normaliser safely positive during later training.
    refine_iters: SLSQP iterations that refine the least-squares coefficients on the attention
        KL itself, under the same constraints (0 = least squares only).
    """

    enabled: bool = True
    sequences: int = 2
    queries: int = 64
    uniform_weight: float = 1.0
    grid: int = 200
    margin: float = 0.01
    refine_iters: int = 100

    def validate(self) -> None:
        _positive(self, "sequences", "queries", "grid")
        _non_negative(self, "refine_iters")
        _non_negative(self, "uniform_weight")
        if not 0 <= self.margin < 1:
            raise DistillError(f"fit.margin must be in [0, 1), got {self.margin}")


@dataclass
class TransferConfig:
    """Stage 2: train each replacement layer to reproduce its teacher attention's output.

    enabled: run this stage.
    steps: optimizer steps per layer (cosine decay of the learning rate to a tenth).
    batch_size: sequences per step.
    sequences: calibration sequences in each layer's training pool (0 = all); the pool's
        activations are held in memory, so large runs use a subset here and the rest in finetune.
    lr: Adam learning rate for the new parameters (feature maps, mixing, decay, stack).
    xent_weight: weight of the attention-weight cross-entropy (Hedgehog) added to the output
        MSE; 0 = MSE only.
    xent_queries: queries per sequence that enter the cross-entropy.
    evicted_weight: weight of the out-of-window readout loss (hybrids only): the linear part
        alone must reproduce the teacher's attention over the keys that have left the softmax
        window, normalised over them (relative MSE per head, queries t ≥ window); 0 = off.
    inputs: ``teacher`` = each layer sees the teacher's hidden states; ``student`` = the hidden
        states of the already converted layers below it (closer to how the student runs).
    position_shift: each step moves its sequences to RoPE positions offset..offset+T−1, with the
        offset drawn from 0..position_shift (0 = off). The teacher's attention output does not
        change under the shift, so the targets stay; the feature maps, which read q and k after
        RoPE, see positions past ``seq_len``.
    eval_sequences: held-out sequences on which the per-layer MSE before/after is measured.
    """

    enabled: bool = True
    steps: int = 100
    batch_size: int = 2
    sequences: int = 0
    lr: float = 1e-2
    xent_weight: float = 0.0
    xent_queries: int = 64
    evicted_weight: float = 0.0
    inputs: str = "teacher"
    position_shift: int = 0
    eval_sequences: int = 2

    def validate(self) -> None:
        _positive(self, "batch_size", "lr", "xent_queries")
        _non_negative(self, "steps", "sequences", "xent_weight", "evicted_weight", "eval_sequences", "position_shift")
        _choice(self, "inputs", TRANSFER_INPUTS)


@dataclass
class SelectConfig:
    """Between transfer and finetune (optional): keep as softmax the layers whose linearisation
    hurts long-range prediction most. ``model.keep_softmax_layers: auto:K`` is a shorthand for
    ``select.keep_softmax: K``.

    keep_softmax: how many converted layers go back to the teacher's softmax attention (0 = off).
    sequences: held-out sequences on which each layer is scored.
    from_position: only next-token losses at this position or later count (long-range), so a
        layer is judged by what its linear part must carry beyond the window.
    """

    keep_softmax: int = 0
    sequences: int = 2
    from_position: int = 256

    def validate(self) -> None:
        _non_negative(self, "keep_softmax", "from_position")
        _positive(self, "sequences")


@dataclass
class FinetuneConfig:
    """Stage 3 (optional): LoRA on the attention projections, trained on KL to the teacher's logits.

    enabled: run this stage.
    steps: optimizer steps (AdamW, cosine decay to a tenth).
    batch_size: sequences per step.
    lr: learning rate.
    lora_rank: LoRA rank r.
    lora_alpha: LoRA scale numerator (the update is alpha / r · BA).
    targets: module names that get LoRA adapters (peft ``target_modules``).
    train_new_params: also train the feature maps, mixing factors, decays and stack sublayers.
    kl_weight: weight of KL(teacher ‖ student) on the logits.
    lm_weight: weight of the next-token cross-entropy.
    temperature: softmax temperature of the KL (scaled back by its square).
    crop: train on random windows of this many tokens cut from the calibration sequences
        (0 = whole sequences); shorter windows buy more steps on a CPU.
    checkpoint_every: optimizer steps between checkpoints.
    eval_every: steps between held-out perplexity checks, recorded as a curve in the report
        (0 = none).
    activation_checkpointing: keep only each decoder layer's input in the forward pass and
        recompute the rest in the backward pass (less memory for longer sequences or larger
        batches, about one more forward pass of time; the same steps).
    """

    enabled: bool = False
    steps: int = 200
    batch_size: int = 1
    lr: float = 1e-4
    lora_rank: int = 8
    lora_alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    train_new_params: bool = True
    kl_weight: float = 1.0
    lm_weight: float = 0.0
    temperature: float = 1.0
    crop: int = 0
    checkpoint_every: int = 50
    eval_every: int = 0
    activation_checkpointing: bool = False

    def validate(self) -> None:
        _positive(self, "batch_size", "lr", "lora_rank", "lora_alpha", "temperature", "checkpoint_every")
        _non_negative(self, "steps", "kl_weight", "lm_weight", "crop", "eval_every")
        if self.crop == 1:
            raise DistillError("finetune.crop must be 0 (whole sequences) or at least 2 tokens")
        if self.enabled and self.steps and self.kl_weight == 0 and self.lm_weight == 0:
            raise DistillError("finetune needs kl_weight > 0 or lm_weight > 0")
        if not self.targets:
            raise DistillError("finetune.targets must name at least one module, e.g. [q_proj, v_proj]")


@dataclass
class RunConfig:
    """Everything ``distill convert`` does; ``model``, ``fit``, ``transfer`` and ``finetune``
    are sections (:class:`distill.ConvertConfig` and the stage dataclasses above).

    data: calibration text: ``wiki`` (offline Wikipedia summaries), ``self`` (the teacher samples
        its own text), a local .txt/.jsonl file or folder, or a Hugging Face dataset name
        (``name`` or ``name:config``, for users online).
    text_field: the text field of .jsonl lines and dataset rows.
    calib_tokens: calibration tokens (training pool, cut into ``seq_len`` windows).
    heldout_tokens: held-out tokens (never trained on) for perplexity and validation.
    seq_len: tokens per sequence.
    seed: seeds data order, sampling and LoRA init; a resumed run ends where a fresh one does.
    dtype: weights dtype: float32, bfloat16 or float16 (new parameters always train in fp32).
    device: auto (cuda if visible), cpu or cuda[:N].
    batch_size_eval: sequences per perplexity forward.
    threads: CPU threads for torch; 0 = auto: one thread on a machine of at most 4 cores that
        other processes keep busy when the run starts (torch's threads then mostly wait on each
        other at every op); torch's default otherwise.
    dist_timeout: under torchrun, seconds a rank waits for the others at a collective before it
        stops with an error (a rank that dies is usually noticed at once); may change on --resume.
    fsdp: under torchrun, shard the teacher's weights over the ranks (FSDP2), for a teacher too big
        for one device: each rank holds 1/N of them and gathers one decoder layer at a time. Layers
        then train data parallel (also with ``transfer.inputs: teacher``). Not with ``data: self``.
        One process ignores it; may change on --resume.
    """

    model: ConvertConfig = field(default_factory=ConvertConfig)
    data: str = "wiki"
    text_field: str = "text"
    calib_tokens: int = 32768
    heldout_tokens: int = 8192
    seq_len: int = 1024
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    batch_size_eval: int = 2
    threads: int = 0
    dist_timeout: float = 1800.0
    fsdp: bool = False
    fit: FitConfig = field(default_factory=FitConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def validate(self) -> None:
        _positive(self, "calib_tokens", "heldout_tokens", "seq_len", "batch_size_eval", "dist_timeout")
        _choice(self, "dtype", DTYPES)
        _non_negative(self, "threads")
        if self.seq_len < 2:
            raise DistillError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.calib_tokens < self.seq_len:
            raise DistillError(f"calib_tokens={self.calib_tokens} is less than one sequence (seq_len={self.seq_len})")
        if self.heldout_tokens < self.seq_len:
            raise DistillError(f"heldout_tokens={self.heldout_tokens} is less than one sequence (seq_len={self.seq_len})")
        for section in (self.fit, self.transfer, self.select, self.finetune):
            section.validate()
        if self.select.keep_softmax and self.model.keep_softmax_layers:
            raise DistillError("give model.keep_softmax_layers as a list or select.keep_softmax (auto:K), not both")
        if self.select.keep_softmax and self.select.from_position >= self.seq_len:
            raise DistillError(
                f"select.from_position={self.select.from_position} leaves no position to score in sequences of "
                f"seq_len={self.seq_len}; lower it"
            )
        if self.transfer.evicted_weight and not self.model.window:
            raise DistillError(
                "transfer.evicted_weight needs model.window > 0 (it trains the linear part on the keys that left the "
                "softmax window); set model.window or transfer.evicted_weight=0"
            )
        if self.transfer.xent_weight and self.model.recurrence != "linear":
            raise DistillError(
                f"transfer.xent_weight needs model.recurrence=linear (explicit attention weights exist only for it), "
                f"got {self.model.recurrence!r}; set transfer.xent_weight=0"
            )

    @property
    def calib_sequences(self) -> int:
        return self.calib_tokens // self.seq_len

    @property
    def heldout_sequences(self) -> int:
        return self.heldout_tokens // self.seq_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        return _build(cls, data, "")


SECTIONS: dict[str, type] = {
    "model": ConvertConfig,
    "fit": FitConfig,
    "transfer": TransferConfig,
    "select": SelectConfig,
    "finetune": FinetuneConfig,
}
AUTO_KEEP = re.compile(r"^auto:(-?\d+)$")


def field_docs(cls: type) -> dict[str, str]:
    """``name: text`` entries of a dataclass docstring (continuation lines indented deeper)."""
    docs: dict[str, str] = {}
    current = None
    for line in (cls.__doc__ or "").splitlines():
        match = re.match(r"^    (\w+): (.*)$", line)
        if match:
            current = match.group(1)
            docs[current] = match.group(2).strip()
        elif current and line.startswith("        ") and line.strip():
            docs[current] += " " + line.strip()
        else:
            current = None
    return docs


def describe_keys() -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every config key, for ``distill convert --help``."""
    rows = []
    defaults = RunConfig()
    top = field_docs(RunConfig)
    for f in dataclasses.fields(RunConfig):
        if f.name in SECTIONS:
            section = getattr(defaults, f.name)
            docs = field_docs(SECTIONS[f.name])
            for sf in dataclasses.fields(section):
                rows.append((f"{f.name}.{sf.name}", getattr(section, sf.name), docs.get(sf.name, "")))
        else:
            rows.append((f.name, getattr(defaults, f.name), top.get(f.name, "")))
    return rows


def _build(cls: type, data: Any, where: str):
    if not isinstance(data, dict):
        raise DistillError(f"config section {where or 'top level'} must be a mapping, got {data!r}")
    values = check_keys(cls, data, where or "the config")
    hints = typing.get_type_hints(cls)
    model = values.get("model")
    if cls is RunConfig and isinstance(model, dict) and isinstance(model.get("keep_softmax_layers"), str):
        values["model"] = _auto_keep(model, values)
    for name, value in list(values.items()):
        key = f"{where}.{name}" if where else name
        if name in SECTIONS and cls is RunConfig:
            values[name] = _build(SECTIONS[name], value if value is not None else {}, key)
        else:
            values[name] = _coerce(value, hints[name], key)
    obj = cls(**values)
    if cls is RunConfig:
        obj.validate()
    return obj


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a field's type; YAML's ``1e-3`` (a string in YAML 1.1) becomes a float."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, list) and all(isinstance(v, args[0]) for v in value):
            return value
    elif origin is dict:
        if isinstance(value, dict):
            return value
    else:
        return value
    name = getattr(hint, "__name__", str(hint))
    raise DistillError(f"config key {key} must be {name}, got {value!r}")


def _auto_keep(model: dict, values: dict) -> dict:
    """``model.keep_softmax_layers: auto:K`` -> ``select.keep_softmax: K`` (the layers are then
    chosen by measurement, see :class:`SelectConfig`)."""
    text = model["keep_softmax_layers"]
    match = AUTO_KEEP.match(text.strip())
    if not match:
        raise DistillError(f"model.keep_softmax_layers must be a list of layer indices or auto:K, got {text!r}")
    select = dict(values.get("select") or {})
    select["keep_softmax"] = int(match.group(1))
    values["select"] = select
    return {k: v for k, v in model.items() if k != "keep_softmax_layers"}


def _positive(obj, *names: str) -> None:
    for name in names:
        if not getattr(obj, name) > 0:
            raise DistillError(f"{_where(obj)}{name} must be > 0, got {getattr(obj, name)!r}")


def _non_negative(obj, *names: str) -> None:
    for name in names:
        if not getattr(obj, name) >= 0:
            raise DistillError(f"{_where(obj)}{name} must be >= 0, got {getattr(obj, name)!r}")


def _choice(obj, name: str, choices: tuple[str, ...]) -> None:
    if getattr(obj, name) not in choices:
        raise DistillError(f"{_where(obj)}{name} must be one of {', '.join(choices)}, got {getattr(obj, name)!r}")


def _where(obj) -> str:
    names = {FitConfig: "fit.", TransferConfig: "transfer.", SelectConfig: "select.", FinetuneConfig: "finetune."}
    return names.get(type(obj), "")


def apply_override(data: dict[str, Any], text: str) -> None:
    """Apply one ``dotted.key=value`` to the nested dict ``data`` (in place)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise DistillError(f"override {text!r} must look like key=value, e.g. transfer.steps=200")
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise DistillError(f"override {key}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = parse_value(raw)


def load_run_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """YAML file (optional), then ``key=value`` overrides, then validation."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise DistillError(f"config file {path} does not exist; see configs/ for the shipped ones")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise DistillError(f"{path} is not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise DistillError(f"{path} must hold a mapping of config keys at the top level")
    for text in overrides:
        apply_override(data, text)
    return RunConfig.from_dict(data)


def dump_run_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
