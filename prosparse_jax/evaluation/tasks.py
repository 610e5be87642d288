"""Tasks: the offline tasks built from the built-in corpus's held-out split, checks of local task files, and the
resolution of task names with lm-eval's :class:`~lm_eval.tasks.TaskManager`.

The offline tasks (:func:`build_offline_tasks`) come from the held-out documents of a corpus source (``stdlib`` by
default: the interpreter's standard library, :data:`prosparse_jax.data.corpus.EVAL_SPLIT`), deterministically (the
same files give the same JSONL bytes), with nothing downloaded:

* ``stdlib_next_line`` (multiple choice, acc / acc_norm): the lines before a line of a Python file, and that line
  among ``choices - 1`` distinct other lines of the same file;
* ``stdlib_next_line_gen`` (generate_until, exact_match): the same items, the line generated greedily up to ``\\n``;
* ``stdlib_ppl`` (loglikelihood_rolling, word / byte perplexity, bits per byte): the beginning of each file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from prosparse_jax import files
from prosparse_jax.config import DataConfig
from prosparse_jax.data import corpus as corpus_lib
from prosparse_jax.errors import DataError, InputError, UsageError, did_you_mean

NEXT_LINE, NEXT_LINE_GEN, PPL = "stdlib_next_line", "stdlib_next_line_gen", "stdlib_ppl"
OFFLINE_TASKS = (NEXT_LINE, NEXT_LINE_GEN, PPL)
FORMAT = 1  # of the offline tasks' items (part of their manifest)
MIN_LINE_CHARS = 8  # a candidate line (and a distractor) has at least this many non-blank characters


def _rng(*keys: Any) -> np.random.Generator:
    digest = hashlib.sha256(json.dumps([FORMAT, *keys]).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def held_out_documents(source: str = "stdlib", eval_fraction: float = DataConfig.eval_fraction
                       ) -> list[tuple[str, str]]:
    """(id, text) of the held-out documents of ``source`` (the corpus's split rule,
    :func:`prosparse_jax.data.corpus.eval_document_mask`), sorted by id; files that are not UTF-8 text are left out
    as the corpus leaves them out."""
    docs = corpus_lib.list_documents(source)
    mask = corpus_lib.eval_document_mask([d.doc_id for d in docs], [d.size for d in docs], eval_fraction)
    out = []
    for d, held in zip(docs, mask, strict=True):
        text = corpus_lib.read_text(d.path) if held else None
        if text:
            out.append((d.doc_id.replace(os.sep, "/"), text))
    return out


def next_line_items(doc_id: str, text: str, *, per_doc: int, choices: int, context_lines: int) -> list[dict[str, Any]]:
    """Up to ``per_doc`` next-line items of one document: {doc_id, line, context, choices, label, target}.

    A candidate line has at least :data:`MIN_LINE_CHARS` non-blank characters, occurs once in the file and follows at
    least one line; its distractors are other such distinct lines of the file. Each item's context is the
    ``context_lines`` lines before it, ending with a newline.
    """
    lines = text.split("\n")
    counts: dict[str, int] = {}
    for ln in lines:
        counts[ln] = counts.get(ln, 0) + 1
    pool = sorted(ln for ln, c in counts.items() if len(ln.strip()) >= MIN_LINE_CHARS)
    cands = [i for i in range(1, len(lines)) if counts[lines[i]] == 1 and len(lines[i].strip()) >= MIN_LINE_CHARS]
    if len(pool) < choices or not cands:
        return []
    rng = _rng(doc_id)
    picked = sorted(rng.choice(len(cands), size=min(per_doc, len(cands)), replace=False).tolist())
    items = []
    for j in picked:
        i = cands[j]
        others = [ln for ln in pool if ln != lines[i]]
        distract = [others[k] for k in rng.choice(len(others), size=choices - 1, replace=False)]
        label = int(rng.integers(choices))
        opts = distract[:label] + [lines[i]] + distract[label:]
        context = "\n".join(lines[max(0, i - context_lines):i]) + "\n"
        items.append({"doc_id": doc_id, "line": i + 1, "context": context, "choices": opts, "label": label,
                      "target": lines[i]})
    return items


def ppl_item(doc_id: str, text: str, max_chars: int) -> dict[str, Any] | None:
    """The first whole lines of a document, at most ``max_chars`` characters (at least one line): {doc_id, text}."""
    head = text[:max_chars]
    if len(text) > max_chars and "\n" in head:
        head = head[:head.rindex("\n") + 1]
    return {"doc_id": doc_id, "text": head} if head.strip() else None


def _yaml(name: str, data: Path, body: str) -> str:
    return (f"# Built by prosparse_jax.evaluation.tasks.build_offline_tasks from {data.name}; rebuild, do not edit.\n"
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
            f"test_split: test\n{body}metadata:\n  version: {FORMAT}.0\n")


_BODIES = {
    NEXT_LINE: ("output_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: label\n"
                "target_delimiter: \"\"\nmetric_list:\n  - metric: acc\n    aggregation: mean\n"
                "    higher_is_better: true\n  - metric: acc_norm\n    aggregation: mean\n"
                "    higher_is_better: true\n"),
    NEXT_LINE_GEN: ("output_type: generate_until\ndoc_to_text: context\ndoc_to_target: target\n"
                    "target_delimiter: \"\"\ngeneration_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 48\n"
                    "  do_sample: false\nmetric_list:\n  - metric: exact_match\n    aggregation: mean\n"
                    "    higher_is_better: true\n"),
    PPL: ("output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: text\nmetric_list:\n"
          "  - metric: word_perplexity\n    aggregation: weighted_perplexity\n    higher_is_better: false\n"
          "  - metric: byte_perplexity\n    aggregation: weighted_perplexity\n    higher_is_better: false\n"
          "  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n"),
}


def build_offline_tasks(out: str | os.PathLike, *, source: str = "stdlib",
                        eval_fraction: float = DataConfig.eval_fraction, max_items: int = 256, per_doc: int = 4,
                        choices: int = 4, context_lines: int = 8, ppl_docs: int = 64, ppl_chars: int = 2000
                        ) -> dict[str, Any]:
    """Writes the offline tasks (JSONL + lm-eval task YAML, :data:`OFFLINE_TASKS`) into the folder ``out``; returns
    their manifest (also written as ``manifest.json``). Deterministic: the same corpus files give the same bytes.

    Raises:
      DataError: the held-out split of ``source`` gives no items.
    """
    if choices < 2 or max_items < 1 or per_doc < 1 or context_lines < 1 or ppl_docs < 1 or ppl_chars < 1:
        raise UsageError("offline tasks: choices >= 2 and max_items, per_doc, context_lines, ppl_docs, ppl_chars >= 1")
    out = files.check_output_path(out, "tasks out")
    docs = held_out_documents(source, eval_fraction)
    items = [it for doc_id, text in docs
             for it in next_line_items(doc_id, text, per_doc=per_doc, choices=choices, context_lines=context_lines)]
    if len(items) > max_items:  # an even spread over the split, in document order
        items = [items[k] for k in np.linspace(0, len(items) - 1, max_items).round().astype(int)]
    ppl = [p for doc_id, text in docs[:: max(1, len(docs) // ppl_docs)][:ppl_docs]
           if (p := ppl_item(doc_id, text, ppl_chars)) is not None]
    if not items or not ppl:
        raise DataError(f"offline tasks: the held-out split of {source!r} ({len(docs)} documents) gives no items; "
                        "use a larger source or eval_fraction")
    out.mkdir(parents=True, exist_ok=True)
    data = {NEXT_LINE: items, NEXT_LINE_GEN: items, PPL: ppl}
    manifest: dict[str, Any] = {"format": FORMAT, "source": source, "eval_fraction": eval_fraction,
                                "documents": len(docs), "tasks": {}}
    for name, rows in data.items():
        jsonl = out / f"{name}.jsonl"
        with files.atomic_file(jsonl) as tmp:
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows),
                           encoding="utf-8")
        with files.atomic_file(out / f"{name}.yaml") as tmp:
            tmp.write_text(_yaml(name, jsonl.absolute(), _BODIES[name]), encoding="utf-8")
        manifest["tasks"][name] = {"items": len(rows), "sha256": hashlib.sha256(jsonl.read_bytes()).hexdigest()}
    with files.atomic_file(out / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# Local task files and task names
# ---------------------------------------------------------------------------------------------------------------
def _yaml_loader() -> Any:
    import yaml

    class Loader(yaml.SafeLoader):
        """lm-eval's task YAML: a ``!function`` tag is kept as its text (not imported here)."""

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return Loader


def _data_files(cfg: dict[str, Any], yaml_path: Path) -> list[Path]:
    """The local JSON / JSONL data files a task config reads (``dataset_path: json``), relative ones from the
    current directory as the datasets library reads them."""
    if cfg.get("dataset_path") != "json":
        return []
    spec = (cfg.get("dataset_kwargs") or {}).get("data_files") if isinstance(cfg.get("dataset_kwargs"), dict) else None
    values = list(spec.values()) if isinstance(spec, dict) else [spec]
    paths = []
    for v in values:
        for p in (v if isinstance(v, list) else [v]):
            if isinstance(p, str) and "://" not in p:
                paths.append(Path(os.path.expanduser(p)))
    return paths


def check_jsonl(path: Path, yaml_path: Path) -> int:
    """The documents of a local JSONL data file; a missing, empty or malformed file is an :class:`InputError` naming
    the file and the line."""
    if not path.is_file():
        raise InputError(f"{yaml_path}: data file {path} not found; build it (or fix data_files)")
    n = 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path} line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(doc, dict):
                raise InputError(f"{path} line {lineno}: a document must be a JSON object, got {type(doc).__name__}")
            n += 1
    if n == 0:
        raise InputError(f"{path}: no documents (an empty data file); the task would have no requests")
    return n


def check_task_dir(path: str | os.PathLike) -> dict[str, Path]:
    """{task name: YAML file} of a folder of local task files, each checked: its YAML parses, it is a mapping, and
    its local JSONL data files parse (:func:`check_jsonl`). lm-eval itself skips a file it cannot parse, which would
    leave its tasks "unknown"; here a malformed file is an :class:`InputError` naming it and the line."""
    import yaml

    root = Path(path)
    if not root.is_dir():
        raise InputError(f"include_path: {root} is not a folder of task YAML files")
    loader, found = _yaml_loader(), {}
    for p in sorted(root.glob("**/*.yaml")):
        if "__pycache__" in p.parts:
            continue
        try:
            cfg = yaml.load(p.read_text(encoding="utf-8"), Loader=loader)  # noqa: S506 - a SafeLoader subclass
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise InputError(f"{p}{where}: malformed task YAML ({e.problem or e.context}); fix the file") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise InputError(f"{p}: malformed task YAML ({' '.join(str(e).split())})") from None
        if not isinstance(cfg, dict):
            raise InputError(f"{p}: not a task config (a YAML mapping with a task: or group: key)")
        for data in _data_files(cfg, p):
            check_jsonl(data, p)
        if isinstance(cfg.get("task"), str):
            found[cfg["task"]] = p
    return found


def task_manager(tasks: list[str], include_paths: list[str | os.PathLike]) -> Any:
    """An lm-eval TaskManager that knows every name of ``tasks`` (the local folders first: without lm-eval's own
    index when they hold them all); an unknown name is a :class:`UsageError` with the closest known one."""
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise UsageError("tasks: give at least one task name")
    local: dict[str, Path] = {}
    for p in include_paths:
        local.update(check_task_dir(p))
    paths = [str(p) for p in include_paths] or None
    if paths and all(t in local for t in tasks):
        return TaskManager(include_path=paths, include_defaults=False)
    tm = TaskManager(include_path=paths)
    for t in tasks:
        if t not in tm.all_tasks:
            hint = did_you_mean(t, tm.all_tasks)
            raise UsageError(f"tasks: unknown task {t!r}{hint}; `lm_eval ls tasks` lists lm-eval's, the offline ones "
                             f"are {', '.join(OFFLINE_TASKS)}, and --include_path=<dir> adds a folder of task YAML")
    return tm
