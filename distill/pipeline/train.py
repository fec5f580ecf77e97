"""What every training stage shares: the run context, the new parameters, and guarded steps.

A stage (fit, transfer, finetune) is a plain function ``run_<stage>(model, data, cfg, ctx)``
that reads its section of the run config, checkpoints itself through ``ctx.store`` and returns
its typed result. Stages import this module and the helpers below it, never each other.

:class:`GuardedSteps` is the one optimizer loop body. The last good parameters are the last ones
whose loss was seen to be finite: a step is taken only from such parameters, and a non-finite
loss (or gradient) restores them, halves the learning rate, starts a fresh optimizer and is
reported as an event. Parameters reached by the final step have not been evaluated yet, so a
stage ends with :meth:`GuardedSteps.finish`, which evaluates them once and restores the last
good ones if that is not finite.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..feature_maps import FeatureMap
from ..recurrence import Recurrence
from ..distributed import Comm
from .layerwise import decoder_layers
from .params import converted_layers, new_parameters

log = logging.getLogger(__name__)

MAX_ROLLBACKS = 3  # a stage (or a layer) stops after this many rollbacks and keeps its last good state


@dataclass
class StageContext:
    """What a stage needs from the run besides the model, its data and its config section.

    seed: the run seed; store: checkpoint entries (``has``/``load``/``save``/``meta``);
    progress: a tqdm-like class; device, dtype: where the teacher's weights live; comm: this
    process's rank among the run's ranks (a world of one by default).
    """

    seed: int
    store: Any
    progress: Callable[..., Any]
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    comm: Comm = field(default_factory=Comm)


def cosine_lr(base: float, step: int, total: int) -> float:
    """Cosine decay from ``base`` to ``base``/10 over ``total`` steps."""
    return base * (0.1 + 0.45 * (1 + math.cos(math.pi * step / max(total, 1))))


def prepare_new_parameters(model: nn.Module) -> None:
    """Freeze the teacher's weights; the parameters conversion added train, in float32."""
    model.requires_grad_(False)
    for i in converted_layers(model):
        for p in new_parameters(decoder_layers(model)[i].self_attn).values():
            p.data = p.data.float()
            p.requires_grad_(True)


def constrain(modules: Iterable[nn.Module]) -> None:
    """Keep every feature map and recurrence inside ``modules`` within its constraints (after a step)."""
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, (FeatureMap, Recurrence)):
                sub.constrain_()


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class GuardedSteps:
    """Optimizer steps that never keep non-finite parameters (see the module docstring).

    params: name -> trainable tensor; make_optimizer(params, lr) builds the optimizer (again after
    a rollback); lr: the base learning rate, decayed by :func:`cosine_lr` over ``total`` steps
    and halved once per earlier event (so a resumed stage continues at the same rate);
    after_step: called after each optimizer step (constraints); where: named in events and logs
    ("layer 3", "finetune"); hint: the fix to suggest; events: earlier events, when resuming;
    comm: the ranks that train these parameters data-parallel. Each rank's ``loss`` is then its
    share of the global loss (they sum to it): the loss values and the gradients are summed over
    ranks before anything is decided, so every rank takes the same steps and rollbacks.
    """

    def __init__(
        self,
        params: dict[str, torch.Tensor],
        make_optimizer: Callable[[Iterable[torch.Tensor], float], torch.optim.Optimizer],
        lr: float,
        total: int,
        where: str,
        hint: str,
        after_step: Callable[[], None] = lambda: None,
        events: list[dict] | None = None,
        event_fields: dict[str, Any] | None = None,
        comm: Comm | None = None,
    ):
        self.comm = comm or Comm()
        self.params, self.make_optimizer, self.total = params, make_optimizer, total
        self.where, self.hint, self.after_step = where, hint, after_step
        self.events = list(events or [])
        self.event_fields = dict(event_fields or {})
        self.lr = lr * 0.5 ** len(self.events)
        self.optimizer = make_optimizer(params.values(), self.lr)
        self.good = {n: p.detach().clone() for n, p in params.items()}
        self.stepped = False  # parameters moved since they were last seen finite

    @property
    def exhausted(self) -> bool:
        return len(self.events) >= MAX_ROLLBACKS

    def step(self, loss: torch.Tensor, step: int) -> float | None:
        """``loss`` was computed from the current parameters. Finite: they become the last good
        ones and one clipped optimizer step follows; returns the loss. Otherwise: roll back (see
        the module docstring); returns None."""
        value = self.comm.sum(float(loss.detach()))[0]
        if not (math.isfinite(value) and all_finite(self.params.values())):
            self._roll_back(step, value, "non-finite loss or parameters")
            return None
        self._commit()
        for group in self.optimizer.param_groups:
            group["lr"] = cosine_lr(self.lr, step, self.total)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._sum_gradients()
        norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), 1.0)
        if not math.isfinite(float(norm)):
            self._roll_back(step, value, "non-finite gradient")
            return None
        self.optimizer.step()
        self.after_step()
        self.stepped = True
        return value

    @torch.no_grad()
    def finish(self, evaluate: Callable[[], float]) -> None:
        """If the last step moved the parameters, evaluate them once (``evaluate()`` -> a loss) and
        restore the last good ones unless that and they are finite."""
        if not self.stepped:
            return
        value = self.comm.sum(float(evaluate()))[0]
        if math.isfinite(value) and all_finite(self.params.values()):
            self._commit()
        else:
            self._roll_back(self.total, value, "the parameters after the last step are not finite on evaluation")

    @torch.no_grad()
    def _sum_gradients(self) -> None:
        """Sum the gradients over the ranks (one flat all-reduce); no-op for one process."""
        if not self.comm.active:
            return
        params = list(self.params.values())
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float() for p in params])
        self.comm.sum_(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
            offset += n

    @torch.no_grad()
    def _commit(self) -> None:
        for name, p in self.params.items():
            self.good[name].copy_(p.detach())
        self.stepped = False

    @torch.no_grad()
    def _roll_back(self, step: int, value: float, what: str) -> None:
        for name, p in self.params.items():
            p.copy_(self.good[name])
        self.stepped = False
        self.lr /= 2
        self.optimizer = self.make_optimizer(self.params.values(), self.lr)
        message = f"{what} at step {step}; rolled back to the last good parameters and halved the learning rate to {self.lr:.3g}"
        self.events.append({**self.event_fields, "step": step, "loss": value, "message": message, "hint": self.hint})
        log.warning("%s: %s (hint: %s)", self.where, message, self.hint)
        if self.exhausted:
            log.warning("%s: stopping after %d rollbacks; keeping the last good parameters", self.where, MAX_ROLLBACKS)
