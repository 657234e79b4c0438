"""Send BFCL questions through `/v1/chat/completions` (the official `openai` client) and write one JSONL row each.

Rows are keyed by (model, mode, max_refine_iterations, category, id): a rerun skips answered rows, so a long run can
be stopped and resumed. Requests that fail (connection errors, 5xx, timeouts) are not written and are retried by
the next run; a 4xx answer is written as an invalid row (the server refused the question).
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any

from tqdm import tqdm

from server.refine import DEFAULT_MAX_ITERATIONS, RefineMode, majority
from training.evaluation import bfcl, multi_turn
from training.resumable import read_jsonl

MODES = tuple(mode.value for mode in RefineMode)  # also the order of the summary's rows
CATEGORIES = bfcl.SUPPORTED + multi_turn.CATEGORIES  # what `toolace-r eval` takes
RESULTS_FILE = "results.jsonl"
RUNS_FILE = "runs.jsonl"


@dataclass
class EvalConfig:
    base_url: str
    model: str
    out: Path
    api_key: str = "EMPTY"
    label: str | None = None  # the model's name in the summary (default: model)
    categories: tuple[str, ...] = bfcl.NON_LIVE
    modes: tuple[str, ...] = (RefineMode.NONE.value,)
    max_refine_iterations: int = DEFAULT_MAX_ITERATIONS
    limit: int | None = None
    seed: int = bfcl.DEFAULT_SEED
    concurrency: int = 4
    temperature: float | None = 0.0
    max_tokens: int | None = None
    timeout: float = 900.0
    underscore_names: bool = False
    progress: bool = True
    max_steps: int = multi_turn.MAX_STEPS  # multi-turn: BFCL's step cap per turn
    max_turns: int | None = None  # multi-turn: play (and score) only the first N turns, for smoke tests
    tool_grammar: bool | None = None  # the server's lazy tool-call grammar per request; None: the server's default

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        for mode in self.modes:
            if mode not in MODES:
                raise ValueError(f"unknown refine mode {mode!r}; choose from {', '.join(MODES)}")
        for category in self.categories:
            if category not in CATEGORIES:
                raise ValueError(f"unsupported category {category!r}; choose from {', '.join(CATEGORIES)}")

    def refine_iterations(self, mode: str) -> int | None:
        """The max_refine_iterations a row in `mode` ran with (None for `none`)."""
        return None if mode == RefineMode.NONE else self.max_refine_iterations

    def request_fields(self, mode: str, tools: list[dict[str, Any]], *, history: bool = False) -> dict[str, Any]:
        """What every request of a question carries besides its messages; `history`: ask for every round's answer."""
        fields: dict[str, Any] = {"model": self.model, "tools": tools}
        if self.temperature is not None:
            fields["temperature"] = self.temperature
        if self.max_tokens is not None:
            fields["max_tokens"] = self.max_tokens
        extension: dict[str, Any] = {}  # servers without the extensions get a plain request for `none`
        if mode != RefineMode.NONE:
            extension = {"refine": mode, "max_refine_iterations": self.max_refine_iterations}
            extension |= {"return_refinement_history": True} if history else {}
        if self.tool_grammar is not None:
            extension["tool_grammar"] = self.tool_grammar
        if extension:
            fields["extra_body"] = extension
        return fields

    def row_head(self, mode: str, question: Any, label: str) -> dict[str, Any]:
        """The fields that name a result row (`row_key` reads them)."""
        return {
            "model": self.model,
            "label": label,
            "mode": mode,
            "max_refine_iterations": self.refine_iterations(mode),
            "category": question.category,
            "id": question.id,
        }


@dataclass
class RunStats:
    sent: int = 0
    skipped: int = 0
    failed: int = 0
    valid: int = 0
    failures: list[str] = field(default_factory=list)


def row_key(row: dict[str, Any]) -> tuple:
    """A row's identity in results.jsonl: runs of one model under two labels (two engines, say) are kept apart."""
    return (row.get("label") or row["model"], row["mode"], row.get("max_refine_iterations"), row["category"], row["id"])


def questions_module(category: str) -> Any:
    """Where a category's questions come from: `multi_turn` for the multi-turn ones, `bfcl` for the rest."""
    return multi_turn if category in multi_turn.CATEGORIES else bfcl


def subset(category: str, limit: int | None, seed: int) -> list[Any]:
    """A category's fixed subset of questions."""
    return questions_module(category).subset(category, limit, seed)


def rejection(exc: Any) -> str:
    """The error type of a 4xx answer that is the question's fault (the row is written, invalid); re-raises the
    rest (5xx, auth, rate limits, timeouts: the server or the setup is wrong), which the next run retries."""
    if exc.status_code >= 500 or exc.status_code in (401, 403, 404, 408, 409, 429):
        raise exc
    body = exc.body if isinstance(exc.body, dict) else {}
    code = (body.get("error") or body).get("code") if isinstance(body, dict) else None
    return f"http_{exc.status_code}:{code or 'error'}"


def _history_scores(question: bfcl.Question, answers: list[str], sent_names: set[str], name_map: dict[str, str]):
    """Score every round's answer alone, and the majority of rounds 1..r (self-consistency at r rounds)."""
    per_round, voted = [], []
    rounds: list[tuple[str, bool]] = []  # (canonical answer, valid)
    for r, text in enumerate(answers):
        calls = [{name_map.get(n, n): a for n, a in c.items()} for c in bfcl.calls_from_text(text, sent_names)]
        valid = bfcl.score(question, calls).valid
        per_round.append(valid)
        rounds.append((bfcl.canonical_text(text), valid))
        voted.append(valid if r == 0 else majority(rounds[1:], key=itemgetter(0))[1])  # the server's own vote
    return per_round, voted


class Evaluator:
    def __init__(self, config: EvalConfig, client: Any | None = None) -> None:
        self.config = config
        if client is None:
            from openai import OpenAI

            client = OpenAI(base_url=config.base_url, api_key=config.api_key, timeout=config.timeout, max_retries=2)
        self.client = client
        self.lock = threading.Lock()

    @property
    def label(self) -> str:
        return self.config.label or self.config.model

    def work(self) -> list[tuple[str, Any]]:
        c = self.config
        return [(mode, q) for mode in c.modes for category in c.categories for q in subset(category, c.limit, c.seed)]

    def key(self, mode: str, question: bfcl.Question | multi_turn.Question) -> tuple:
        return row_key(self.config.row_head(mode, question, self.label))

    def ask(self, mode: str, question: bfcl.Question | multi_turn.Question) -> dict[str, Any]:
        """One question, one request; the row to write. A failed request that is not the question's fault raises
        (see `rejection`); the next run retries it."""
        import openai

        if isinstance(question, multi_turn.Question):  # a conversation: many requests
            return multi_turn.ask(self.client, self.config, mode, question, self.label)
        c = self.config
        tools = question.tools(c.underscore_names)
        row = c.row_head(mode, question, self.label)
        started = time.monotonic()
        try:
            request = c.request_fields(mode, tools, history=True) | {"messages": question.messages}
            response = self.client.chat.completions.create(**request)
        except openai.APIStatusError as exc:
            row.update(
                request_id=None,
                latency_s=round(time.monotonic() - started, 3),
                raw=None,
                calls=None,
                valid=False,
                error_type=rejection(exc),
                error=str(exc)[:500],
                rounds=None,
                stop_reason=None,
                usage=None,
            )
            return row
        row["latency_s"] = round(time.monotonic() - started, 3)
        return row | self._scored(mode, question, response)

    def _scored(self, mode: str, question: bfcl.Question, response: Any) -> dict[str, Any]:
        """An answer's row fields: what came back, its score, and with refinement each round's answer scored."""
        name_map = question.name_map(self.config.underscore_names)
        message = response.choices[0].message
        tool_calls = [tc.model_dump() for tc in (message.tool_calls or [])]
        calls, decode_error = bfcl.calls_from_tool_calls(tool_calls, name_map)
        result = bfcl.score(question, calls, decode_error)
        refinement = (response.model_extra or {}).get("refinement") or {}
        usage = response.usage.model_dump() if response.usage else None
        fields: dict[str, Any] = {
            "request_id": response.id,
            "raw": {
                "content": message.content,
                "tool_calls": [
                    {"name": tc["function"]["name"], "arguments": tc["function"]["arguments"]} for tc in tool_calls
                ],
                "finish_reason": response.choices[0].finish_reason,
            },
            "calls": calls,
            "valid": result.valid,
            "error_type": result.error_type,
            "error": result.error,
            "rounds": refinement.get("iterations", 0 if mode == RefineMode.NONE else None),
            "stop_reason": refinement.get("stop_reason"),
            "usage": {k: usage.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
            if usage
            else None,
        }
        if answers := refinement.get("answers"):
            per_round, majority = _history_scores(question, answers, set(name_map), name_map)
            fields.update(history=answers, history_valid=per_round, history_majority_valid=majority)
        return fields

    def run(self) -> RunStats:
        c = self.config
        c.out.mkdir(parents=True, exist_ok=True)
        results = c.out / RESULTS_FILE
        done = {row_key(r): r for r in read_jsonl(results)}
        work = self.work()
        pending = [(m, q) for m, q in work if self.key(m, q) not in done]
        stats = RunStats(skipped=len(work) - len(pending))
        answered: dict[str, list[bool]] = {mode: [] for mode in c.modes}
        for m, q in work:
            if self.key(m, q) in done:
                answered[m].append(bool(done[self.key(m, q)]["valid"]))
        with (c.out / RUNS_FILE).open("a", encoding="utf-8") as f:
            record = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(c).items() if k != "api_key"}
            f.write(
                json.dumps({"started": time.strftime("%Y-%m-%dT%H:%M:%S"), **record, "pending": len(pending)}) + "\n"
            )
        bar = tqdm(total=len(pending), desc="bfcl", unit="q", dynamic_ncols=True, disable=not c.progress)
        with results.open("a", encoding="utf-8") as out, ThreadPoolExecutor(max(1, c.concurrency)) as pool:
            futures = {pool.submit(self.ask, m, q): (m, q) for m, q in pending}
            for future in as_completed(futures):
                mode, question = futures[future]
                try:
                    row = future.result()
                except Exception as exc:  # noqa: BLE001 - logged, counted, retried by the next run
                    stats.failed += 1
                    stats.failures.append(f"{mode} {question.id}: {type(exc).__name__}: {exc}"[:300])
                    bar.update(1)
                    continue
                with self.lock:
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                    out.flush()
                stats.sent += 1
                stats.valid += bool(row["valid"])
                answered[mode].append(bool(row["valid"]))
                bar.set_postfix_str(_running_accuracy(answered), refresh=False)
                bar.update(1)
        bar.close()
        return stats


def _running_accuracy(answered: dict[str, list[bool]]) -> str:
    return " ".join(f"{m}={100 * sum(v) / len(v):.1f}%" for m, v in answered.items() if v)
