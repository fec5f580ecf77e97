"""Run lm-eval on in-memory models and compare a student with its teacher.

Each model is wrapped in lm-eval's ``HFLM`` (through :class:`SharedPrefixLM`, which runs a
multiple-choice context once for all its choices; no second download, no ``trust_remote_code``) and
scored by ``lm_eval.simple_evaluate``. The report holds lm-eval's own results for both models,
one row per (task, metric) with the student's recovery of the teacher's score, a RADLADS-style
relative score for multiple-choice accuracy (chance subtracted), and a one-line summary.

The ``long`` suite adds ``passkey`` (an lm-eval generation task, run with a context long enough for
its prompts) and ``long_ppl`` (run by distill, :data:`~distill.eval.tasks.DIRECT_TASKS`); their
results join lm-eval's in the same layout, and the report gains a long-context section with
plots beside the JSON (:mod:`distill.eval.long_context`).
"""
from __future__ import annotations

import functools
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..convert import set_sparse_cache
from ..distributed import is_rank_zero
from ..errors import DistillError
from ..files import atomic_write_text
from . import long_context as long_report
from .long_context import LongContextOptions
from .passkey import context_needed, is_passkey_task, parse_cell
from .tasks import DIRECT_TASKS, chance_levels, load_tasks, prepare_offline_data, resolve_tasks, task_manager

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048
BOOTSTRAP_ITERS = 1000  # lm-eval bootstraps stderr only for a few metrics; 100k draws is minutes on CPU
MC_METRICS = ("acc", "acc_norm")
NOT_METRICS = {"alias", "sample_len", "sample_count"}  # bookkeeping entries in lm-eval's per-task results
GENERATION_TOKENS_PER_BATCH = 1024  # x batch_size: long passkey prompts run in smaller batches


def max_length_for(model, requested: int | None) -> int:
    """The context lm-eval may use: ``requested``, else 2048 capped by the model's positions."""
    if requested is not None:
        if requested < 2:
            raise DistillError(f"--max-length must be at least 2, got {requested}")
        return requested
    positions = getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH
    return min(DEFAULT_MAX_LENGTH, positions)


def evaluate_model(model, tokenizer, tasks: list[Any], *, manager=None, batch_size: int = 8,
                   max_length: int | None = None, limit: int | None = None) -> dict[str, Any]:
    """lm-eval results of one model on ``tasks`` (names, config dicts or Task/Group objects)."""
    from lm_eval import simple_evaluate

    from .shared_prefix import SharedPrefixLM

    model.eval()
    # Rolling perplexity splits text into windows of max_length tokens, so it is always explicit.
    lm = SharedPrefixLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length_for(model, max_length))
    results = simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, limit=limit, bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False
    )
    if results is None:  # a rank other than 0: lm-eval gathered its scores on rank 0
        return {}
    results.pop("samples", None)
    return results


def merge_results(into: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """lm-eval results of more tasks added to ``into``: per-task tables merge, the rest stays."""
    for key, value in more.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            into[key] = {**into[key], **value}
        else:
            into.setdefault(key, value)
    return into


def evaluate_all(model, tokenizer, objects: list[Any], direct: list[str], *, manager=None, batch_size: int = 8,
                 max_length: int | None = None, limit: int | None = None,
                 options: LongContextOptions | None = None) -> dict[str, Any]:
    """Results of one model on lm-eval ``objects`` and distill's ``direct`` tasks, in one lm-eval layout.

    Passkey tasks run apart from the rest, with a context as long as their prompts plus the answer
    (``max_length`` stays what rolling perplexity uses) and batches of at most
    ``batch_size * GENERATION_TOKENS_PER_BATCH`` tokens.
    """
    options = options or LongContextOptions()
    positions = getattr(model.config, "max_position_embeddings", None)
    generation = [o for o in objects if is_passkey_task(o)]
    rest = [o for o in objects if not is_passkey_task(o)]
    results = evaluate_model(model, tokenizer, rest, manager=manager, batch_size=batch_size, max_length=max_length,
                             limit=limit) if rest else {}
    for task in generation:
        needed = context_needed(task)
        prompt = needed - int((task.config.generation_kwargs or {}).get("max_gen_toks", 0))
        if positions is not None and prompt > positions:
            raise DistillError(f"passkey prompts of {prompt} tokens are above this model's max_position_embeddings "
                               f"({positions}); use --passkey-lengths up to {positions}")
        small = max(1, min(batch_size, batch_size * GENERATION_TOKENS_PER_BATCH // needed))
        log.info("%s: prompts up to %d tokens, batches of %d", task.task_name, prompt, small)
        merge_results(results, evaluate_model(model, tokenizer, [task], manager=manager, batch_size=small,
                                              max_length=needed, limit=limit))
    for name in direct if is_rank_zero() else ():  # distill's own tasks run on rank 0
        spec = DIRECT_TASKS[name]
        merge_results(results, spec.evaluate(model, tokenizer, getattr(options, spec.options_field)))
    return results


@dataclass
class Row:
    """One metric of one task. ``recovery`` and ``relative`` are percentages, None without a teacher."""

    task: str
    metric: str
    student: float
    teacher: float | None = None
    higher_is_better: bool = True
    chance: float | None = None

    @property
    def recovery(self) -> float | None:
        """student/teacher, or teacher/student where lower is better (perplexity, bits per byte)."""
        t, s = self.teacher, self.student
        if t is None or not (_finite(t) and _finite(s)) or (t if self.higher_is_better else s) == 0:
            return None
        return 100 * (s / t if self.higher_is_better else t / s)

    @property
    def relative(self) -> float | None:
        """(student - chance) / (teacher - chance), RADLADS-style; multiple-choice accuracy only."""
        if self.chance is None or self.teacher is None or self.teacher == self.chance or self.metric not in MC_METRICS:
            return None
        return 100 * (self.student - self.chance) / (self.teacher - self.chance)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"recovery": self.recovery, "relative": self.relative}


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def task_metrics(results: dict[str, Any], task: str) -> dict[str, float]:
    """``{metric: value}`` of one task in lm-eval results; stderr and the ``none`` filter dropped."""
    out = {}
    for key, value in results["results"].get(task, {}).items():
        metric, _, filt = key.partition(",")
        if metric in NOT_METRICS or metric.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        out[metric if filt in ("", "none") else f"{metric},{filt}"] = float(value)
    return out


def compare(student: dict[str, Any], teacher: dict[str, Any] | None, names: list[str],
            chance: dict[str, float], headline: dict[str, str] | None = None) -> list[Row]:
    """Rows for the top-level tasks ``names``, headline metric first within each task."""
    rows = []
    for task in names:
        s, t = task_metrics(student, task), task_metrics(teacher, task) if teacher else {}
        better = student.get("higher_is_better", {}).get(task, {})
        first = (headline or {}).get(task)
        for metric in sorted(s, key=lambda m: m != first):
            rows.append(Row(task, metric, s[metric], t.get(metric), better.get(metric.split(",")[0], True), chance.get(task)))
    return rows


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "–"
    if pct:
        return f"{x:.1f}"
    return f"{x:.4f}" if abs(x) < 10 else f"{x:.2f}"


def markdown(rows: list[Row]) -> str:
    """The report's table; passkey's per-(length, depth) cells are left to the long-context section."""
    lines = [
        "| task | metric | teacher | student | recovery % | relative % |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if parse_cell(r.metric):
            continue
        lines.append(
            f"| {r.task} | {r.metric} | {_fmt(r.teacher)} | {_fmt(r.student)} | {_fmt(r.recovery, True)} | {_fmt(r.relative, True)} |"
        )
    lines += [
        "",
        "recovery = student / teacher; for lower-is-better metrics (perplexities, bits_per_byte) it is "
        "teacher / student, so 100% means as good as the teacher either way. relative = (student - chance) / "
        "(teacher - chance) for multiple-choice accuracy (RADLADS-style), chance = mean of 1 / number of choices. "
        "The summary line averages the first metric listed for each task.",
    ]
    return "\n".join(lines) + "\n"


def summary(rows: list[Row], headline: dict[str, str], wall: dict[str, float]) -> str:
    """One line: mean recovery and relative score over each task's headline metric; wall time per
    model includes loading it."""
    firsts = {}
    for r in rows:
        if headline.get(r.task, r.metric) == r.metric:
            firsts.setdefault(r.task, r)
    heads = list(firsts.values())
    times = ", ".join(f"{role} {sec:.0f} s" for role, sec in wall.items())
    if all(r.teacher is None for r in heads):
        scores = "; ".join(f"{r.task} {r.metric} {_fmt(r.student)}" for r in heads)
        return f"student on {len(heads)} task(s): {scores} (wall: {times})"
    rec = [r.recovery for r in heads if r.recovery is not None]
    rel = [r.relative for r in heads if r.relative is not None]
    text = f"student recovers {sum(rec) / max(len(rec), 1):.1f}% of the teacher (mean over {len(rec)} task(s)"
    if rel:
        text += f"; relative {sum(rel) / len(rel):.1f}% over {len(rel)} multiple-choice task(s), chance subtracted"
    return text + f"; wall: {times})"


@functools.lru_cache(maxsize=4)
def _manager(include_path: str | None, metadata: str | None = None):
    """A TaskManager per (include_path, JSON metadata): indexing every lm-eval YAML takes seconds; reuse it."""
    return task_manager(include_path, json.loads(metadata) if metadata else None)


def _top_name(obj) -> str:
    return getattr(obj, "task_name", None) or obj.name


def run(models: dict[str, str], tasks: str, *, include_path: str | None = None, limit: int | None = None,
        batch_size: int = 8, max_length: int | None = None, dtype: str = "float32",
        reuse: list[str | Path] | None = None, loader: Callable | None = None,
        long_context: LongContextOptions | None = None, sparse_cache: int | None = None) -> dict[str, Any] | None:
    """Evaluate ``models`` (role -> spec; roles ``student`` and optionally ``teacher``) on ``tasks``,
    both with weights in ``dtype`` (under torchrun: data parallel; None on ranks other than 0). A model already scored in one of the ``reuse`` reports (same
    model, tasks, limit, dtype and max_length) is taken from there instead of evaluated again: a
    teacher is scored once for many students, and teacher and student can run as two processes.

    Tasks are resolved, and their data fetched, before any model is loaded, so a bad task name or
    a missing dataset fails in seconds. Models are loaded one at a time (``loader(spec, dtype)`` ->
    ``(model, tokenizer)``, default :func:`distill.models.load_model`) and freed after their run.

    ``long_context`` sets the ``long`` suite's tasks. Passkey prompts are built once, with the
    student's tokenizer, and both models are asked the same ones. ``sparse_cache`` (not None)
    switches the student's sparse global cache to that many keys per kv head.
    """
    if loader is None:
        from ..models import load_model as loader
    if limit is not None and limit < 1:
        raise DistillError(f"--limit must be a positive number of examples, got {limit}")
    if batch_size < 1:
        raise DistillError(f"--batch-size must be at least 1, got {batch_size}")
    long_context = long_context or LongContextOptions()
    include = str(include_path) if include_path else None
    manager = _manager(include)
    plan = resolve_tasks(tasks, manager)
    if long_report.PASSKEY in plan.names:  # its prompts need a tokenizer and settings: lm-eval passes them as metadata
        metadata = {"tokenizer": models["student"], **long_context.passkey.metadata()}
        manager = _manager(include, json.dumps(metadata, sort_keys=True))
    prepare_offline_data(plan, long_context)
    objects = load_tasks(plan, manager)  # builds the passkey prompts: a length above the positions fails here
    names = [_top_name(o) for o in objects] + plan.direct
    chance = chance_levels(objects, limit)
    long_settings = long_context.to_dict()

    results: dict[str, dict[str, Any]] = {}
    wall: dict[str, float] = {}
    lengths: dict[str, int] = {}
    reused = _reuse(reuse or [], models, names, limit=limit, dtype=dtype, max_length=max_length, long_settings=long_settings,
                    sparse_cache=sparse_cache)
    for role, prior in reused.items():
        log.info("%s %s: results reused from %s", role, models[role], ", ".join(prior["from"]))
        results[role], wall[role], lengths[role] = prior["results"], prior["wall"], prior["max_length"]
    for role in ("teacher", "student"):
        if models.get(role) is None or role in reused:
            continue
        start = time.perf_counter()
        model, tokenizer = loader(models[role], getattr(torch, dtype))  # loaded in dtype: no float32 copy first
        model = model.to(getattr(torch, dtype))  # a no-op unless the loader kept another dtype
        if role == "student" and sparse_cache is not None:
            set_sparse_cache(model, sparse_cache)
        lengths[role] = max_length_for(model, max_length)
        objects = objects or load_tasks(plan, manager)  # fresh Task objects for each model
        log.info("evaluating %s %s on %s (max_length %d)", role, models[role], ", ".join(names), lengths[role])
        results[role] = evaluate_all(model, tokenizer, objects, plan.direct, manager=manager, batch_size=batch_size,
                                     max_length=lengths[role], limit=limit, options=long_context)
        objects = None
        del model, tokenizer
        wall[role] = time.perf_counter() - start

    if not is_rank_zero():
        return None
    rows = compare(results["student"], results.get("teacher"), names, chance, plan.headline)
    line = summary(rows, plan.headline, wall)
    report = {
        "tasks": names,
        "models": {role: models.get(role) for role in ("student", "teacher")},
        "reused": {role: prior["from"] for role, prior in reused.items()},
        "settings": {"limit": limit, "batch_size": batch_size, "dtype": dtype, "max_length": lengths,
                     "bootstrap_iters": BOOTSTRAP_ITERS, "long_context": long_settings, "sparse_cache": sparse_cache},
        "wall_time_s": wall,
        "chance": chance,
        "rows": [r.to_dict() for r in rows],
        "summary": line,
        "markdown": markdown(rows),
        "lm_eval": {"student": results["student"], "teacher": results.get("teacher")},
    }
    long = long_report.section({role: results.get(role) for role in ("teacher", "student")}, long_context)
    if long:
        report["long_context"] = long
    return report


def _same_model(a: str, b: str) -> bool:
    """Specs name the same model: equal strings, or the same local path."""
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def _reuse(paths: list[str | Path], models: dict[str, str | None], names: list[str], *, limit, dtype,
           max_length, long_settings: dict[str, Any] | None = None, sparse_cache: int | None = None) -> dict[str, dict[str, Any]]:
    """role -> {"results", "wall", "max_length", "from"} for each model that earlier reports scored
    on all of ``names`` with the same settings; one report may cover some of the tasks and another
    the rest (the model's wall time is then their sum). Every report must match one of the models."""
    parts: dict[str, list[tuple[Path, dict, str]]] = {}
    for path in map(Path, paths):
        try:
            prior = json.loads(path.read_text(encoding="utf-8"))
            prior_models, settings = prior["models"], prior["settings"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DistillError(f"--reuse {path}: not a readable distill eval report ({err})") from None
        matched = False
        for role, spec in models.items():
            for prior_role, prior_spec in prior_models.items():
                if spec is None or prior_spec is None or not _same_model(spec, prior_spec):
                    continue
                if (sparse_cache if role == "student" else None) != (settings.get("sparse_cache") if prior_role == "student" else None):
                    continue  # the same folder with another sparse cache is another model
                long_tasks = set(prior["tasks"]) & set(long_report.TASKS)
                same = (set(prior["tasks"]) <= set(names) and settings["limit"] == limit
                        and settings.get("dtype", "float32") == dtype
                        and (max_length is None or settings["max_length"][prior_role] == max_length)
                        and all((settings.get("long_context") or {}).get(t) == (long_settings or {}).get(t)
                                for t in long_tasks))  # each long task's options sit under its name
                if not same:
                    raise DistillError(
                        f"--reuse {path}: {spec} was scored there with other tasks or settings (tasks {prior['tasks']}, "
                        f"limit {settings['limit']}, dtype {settings.get('dtype', 'float32')}, max_length "
                        f"{settings['max_length'][prior_role]}); run without --reuse or with matching options"
                    )
                parts.setdefault(role, []).append((path, prior, prior_role))
                matched = True
        if not matched:
            raise DistillError(f"--reuse {path}: it scored {', '.join(s for s in prior_models.values() if s)}, "
                               f"not {' or '.join(s for s in models.values() if s)}")
    found = {}
    for role, reports in parts.items():
        covered = {t for _, prior, _ in reports for t in prior["tasks"]}
        if covered != set(names):
            missing = ", ".join(t for t in names if t not in covered)
            raise DistillError(f"--reuse: the reports of {models[role]} do not cover {missing}; score it there first")
        merged: dict[str, Any] = {}
        for _, prior, prior_role in reports:
            for key, value in prior["lm_eval"][prior_role].items():
                if isinstance(value, dict):
                    merged.setdefault(key, {}).update(value)  # per-task entries: results, higher_is_better, ...
        found[role] = {
            "results": merged,
            "wall": sum(prior["wall_time_s"][r] for _, prior, r in reports),
            "max_length": reports[0][1]["settings"]["max_length"][reports[0][2]],
            "from": [str(path) for path, _, _ in reports],
        }
    return found


def write_report(report: dict[str, Any], out: Path) -> Path:
    """``out`` (JSON, with lm-eval's ``handle_non_serializable``) and the table beside it as ``.md``;
    with long-context results, their section in the Markdown and their PNGs beside ``out``."""
    from lm_eval.utils import handle_non_serializable

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    long = report.get("long_context")
    images = long_report.write_plots(long, out) if long else {}
    if images:
        report["plots"] = sorted(images.values())
    atomic_write_text(out, json.dumps(report, indent=2, default=handle_non_serializable) + "\n")
    md = out.with_suffix(".md")
    section = long_report.markdown(long, images) if long else ""
    atomic_write_text(md, f"# distill eval\n\n{report['markdown']}{section}\n{report['summary']}\n")
    return md
