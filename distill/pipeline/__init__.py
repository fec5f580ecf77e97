"""``distill convert``: fit, transfer and (optionally) finetune a converted model, with checkpoints.

Modules, in the order a run uses them: :mod:`.config` (the run config), :mod:`.data`
(calibration text), :mod:`.fit` (stage 1), :mod:`.transfer` (stage 2), :mod:`.finetune`
(stage 3), :mod:`.evaluate` (perplexity), :mod:`.checkpoint` (the run folder),
:mod:`.report`, :mod:`.run` (the stages top to bottom) and :mod:`.command` (the CLI).
"""
from .config import FinetuneConfig, FitConfig, RunConfig, TransferConfig, load_run_config
from .run import convert

__all__ = ["FinetuneConfig", "FitConfig", "RunConfig", "TransferConfig", "convert", "load_run_config"]
