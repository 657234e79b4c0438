"""results.jsonl -> summary.md (the paper's layout) and the rounds plots.

Table: one row per (model, refine mode[, max rounds]); BFCL's single-turn categories as columns (accuracy in %), then
Overall (the unweighted mean of those category accuracies, as BFCL averages its categories), then the multi-turn
categories (their own columns, outside Overall) and the average number of refine rounds. Plots: accuracy against the
number of refine rounds (the paper's Figure 3) and the distribution of rounds.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from server.refine import RefineMode
from training.evaluation import bfcl, multi_turn
from training.evaluation.runner import CATEGORIES, MODES, RESULTS_FILE, questions_module
from training.resumable import read_jsonl

SUMMARY_FILE = "summary.md"
ROUNDS_PLOT = "accuracy_vs_rounds.png"
DISTRIBUTION_PLOT = "rounds_distribution.png"

_HEADERS = {
    "simple_python": "Simple",
    "multiple": "Multiple",
    "parallel": "Parallel",
    "parallel_multiple": "Parallel Multiple",
    "irrelevance": "Irrelevance",
    "multi_turn_base": "Multi Turn Base",
}


def _group_key(row: dict[str, Any]) -> tuple:
    return (row.get("label") or row["model"], row["mode"], row.get("max_refine_iterations"))


def _mode_name(mode: str, iterations: int | None) -> str:
    if iterations is None:
        return mode
    return f"{mode} (≤{iterations})" if mode == RefineMode.ADAPTIVE else f"{mode} ({iterations})"


def _categories(rows: list[dict[str, Any]]) -> list[str]:
    """The categories present, single-turn ones first (Overall's), then multi-turn ones."""
    present = {r["category"] for r in rows}
    return [c for c in CATEGORIES if c in present]


def _size(category: str) -> int:
    return len(questions_module(category).load_category(category))


def _dedupe(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from training.evaluation.runner import row_key

    return list({row_key(r): r for r in rows}.values())


def load(out: Path) -> list[dict[str, Any]]:
    return _dedupe(list(read_jsonl(Path(out) / RESULTS_FILE)))


# Vanilla and self-consistency send the same requests, so the server runs the same rounds for both; they differ only
# in the answer returned (the last round's, or the majority of rounds 1..n). A vanilla row keeps the score of that
# majority too, so one vanilla run also gives a self-consistency row, named as such.
SC_FROM_VANILLA = "self_consistency from vanilla"


def with_self_consistency_from_vanilla(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    derived = [
        {**row, "mode": SC_FROM_VANILLA, "valid": row["history_majority_valid"][-1], "error_type": None}
        for row in rows
        if row["mode"] == RefineMode.VANILLA and row.get("history_majority_valid")
    ]
    return rows + derived


def table(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """{(label, mode, iterations): {"acc": {category: %}, "n": {category: count}, "overall", "rounds"}}"""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[_group_key(row)].append(row)
    categories = _categories(rows)
    mode_order = {m: i for i, m in enumerate(MODES)}
    result = {}
    for key in sorted(groups, key=lambda k: (k[0], mode_order.get(k[1], 99), k[2] or 0)):
        members = groups[key]
        acc, n = {}, {}
        for category in categories:
            scores = [bool(r["valid"]) for r in members if r["category"] == category]
            n[category] = len(scores)
            if scores:
                acc[category] = 100.0 * sum(scores) / len(scores)
        rounds = [r["rounds"] for r in members if r.get("rounds") is not None]
        turns_right = [r["turns_right"] for r in members if r.get("turns_right") is not None]
        single = [v for c, v in acc.items() if c not in multi_turn.CATEGORIES]
        result[key] = {
            "acc": acc,
            "n": n,
            "overall": sum(single) / len(single) if single else None,
            "rounds": sum(rounds) / len(rounds) if rounds else None,
            "turns_right": sum(turns_right) / len(turns_right) if turns_right else None,
            "latency": sum(r.get("latency_s") or 0 for r in members) / len(members),
            "tokens": sum((r.get("usage") or {}).get("total_tokens") or 0 for r in members) / len(members),
        }
    return result


_INTRO = (
    "Accuracy (%) by BFCL's AST checker; Overall is the unweighted mean of the categories shown; Avg rounds is the "
    "mean number of refine rounds after the first answer (`refinement.iterations`). Rows with fewer questions than "
    "a full category are marked partial in the second table."
)
_MULTI_TURN_INTRO = (
    "Accuracy (%) by BFCL's AST checker; Overall is the unweighted mean of the single-turn categories shown. Multi "
    "Turn Base (whole conversations played as an agent: the calls run against BFCL's backends, scored by BFCL's "
    "multi-turn checker) is not in Overall; Turns right is the mean number of its leading turns that passed the "
    "checker (a question stops at its first failing turn). Avg rounds is the mean number of refine rounds after the "
    "first answer (`refinement.iterations`; multi-turn: per request). Rows with fewer questions than a full category "
    "are marked partial in the second table."
)


def _number(value: float | None) -> str:
    """A table cell: two decimals, or a dash where there is nothing to show."""
    return f"{value:.2f}" if value is not None else "–"


def summary_markdown(rows: list[dict[str, Any]]) -> str:
    categories = _categories(rows)
    single = [c for c in categories if c not in multi_turn.CATEGORIES]
    multi = [c for c in categories if c in multi_turn.CATEGORIES]
    stats = table(rows)
    full = {c: _size(c) for c in categories}
    head = ["Model", "Refine", *(_HEADERS.get(c, c) for c in single), "Overall"]
    head += [*(_HEADERS.get(c, c) for c in multi), *(["Turns right"] if multi else []), "Avg rounds"]
    lines = [
        "# BFCL through /v1/chat/completions",
        "",
        _MULTI_TURN_INTRO if multi else _INTRO,
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for (label, mode, iterations), s in stats.items():
        cells = [_number(s["acc"].get(c)) for c in categories]
        turns = [_number(s["turns_right"])] if multi else []
        cells = [*cells[: len(single)], _number(s["overall"]), *cells[len(single) :], *turns, _number(s["rounds"])]
        lines.append("| " + " | ".join([label, _mode_name(mode, iterations), *cells]) + " |")
    lines += [
        "",
        "Questions answered (of the category's size), mean latency per question and mean tokens (all rounds):",
        "",
        "| Model | Refine | " + " | ".join(_HEADERS.get(c, c) for c in categories) + " | s / question | tokens |",
        "|" + "---|" * (len(categories) + 4),
    ]
    for (label, mode, iterations), s in stats.items():
        cells = [f"{s['n'][c]}/{full[c]}" for c in categories]
        lines.append(
            "| "
            + " | ".join([label, _mode_name(mode, iterations), *cells, f"{s['latency']:.1f}", f"{s['tokens']:.0f}"])
            + " |"
        )
    pairs = paired(rows)
    references = sorted({label for cells in pairs.values() for label in cells})
    if references:
        lines += [
            "",
            "Paired with each model's `none` run on the questions both answered (pooled over categories, so rows that "
            "are still partial compare fairly): points gained, right answers of the `none` run → of this row, and "
            "how many questions they share:",
            "",
            "| Model | Refine | " + " | ".join(f"vs {label}, none" for label in references) + " |",
            "|" + "---|" * (len(references) + 2),
        ]
        for (label, mode, iterations), by_reference in pairs.items():
            shown = [_paired_cell(*by_reference[r]) if r in by_reference else "–" for r in references]
            lines.append("| " + " | ".join([label, _mode_name(mode, iterations), *shown]) + " |")
    agreeing = agreement(rows)
    if agreeing:
        lines += [
            "",
            "Answers identical between models run in the same mode (the decoded calls, or the text where there is no "
            "call; multi-turn: every step), on the questions both answered:",
            "",
            "| Models | Refine | identical |",
            "|---|---|---|",
        ]
        for (a, b, mode, iterations), (same, shared) in agreeing.items():
            share = f"{100.0 * same / shared:.1f}% ({same} of {shared})"
            lines.append(f"| {a} / {b} | {_mode_name(mode, iterations)} | {share} |")
    errors = _error_types(rows)
    if errors:
        lines += ["", "Most frequent error types:", "", "| Model | Refine | error type | count |", "|---|---|---|---|"]
        for (label, mode, iterations), counts in errors.items():
            for error_type, count in counts[:5]:
                lines.append(f"| {label} | {_mode_name(mode, iterations)} | `{error_type}` | {count} |")
    return "\n".join(lines) + "\n"


def paired(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, tuple[int, int, int]]]:
    """{group: {label of a `none` run: (questions both answered, that run's right answers, the group's)}}"""
    answers: dict[tuple, dict[tuple[str, str], bool]] = defaultdict(dict)
    for row in rows:
        answers[_group_key(row)][(row["category"], row["id"])] = bool(row["valid"])
    references = {key[0]: a for key, a in answers.items() if key[1] == RefineMode.NONE}
    result = {}
    for key in table(rows):  # the summary's row order
        cells = {}
        for label, reference in references.items():
            shared = answers[key].keys() & reference.keys()
            if key != (label, RefineMode.NONE, None) and shared:
                cells[label] = (len(shared), sum(reference[q] for q in shared), sum(answers[key][q] for q in shared))
        if cells:
            result[key] = cells
    return result


def _final_answer(row: dict[str, Any]) -> str:
    if "turns" in row:
        turns = row["turns"]
        return turns if isinstance(turns, str) else json.dumps(turns, sort_keys=True)
    raw = row.get("raw") or {}
    calls = [[c["name"], _arguments(c["arguments"])] for c in raw.get("tool_calls") or []]
    return json.dumps([calls, None if calls else (raw.get("content") or "").strip()], sort_keys=True)


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)  # so that spacing does not count as a difference
    except ValueError:
        return text


def agreement(rows: list[dict[str, Any]]) -> dict[tuple, tuple[int, int]]:
    """{(label a, label b, mode, iterations): (identical answers, questions both answered)} for models run alike.

    Two engines on the same weights should agree on nearly every greedy answer (issue 21 asks for 95%)."""
    answers: dict[tuple, dict[tuple[str, str], str]] = defaultdict(dict)
    for row in rows:
        if row["mode"] != SC_FROM_VANILLA:  # its answer is one of the vanilla row's rounds
            answers[_group_key(row)][(row["category"], row["id"])] = _final_answer(row)
    result = {}
    for key_a, key_b in itertools.combinations(sorted(answers, key=str), 2):
        if key_a[1:] != key_b[1:]:
            continue
        shared = answers[key_a].keys() & answers[key_b].keys()
        if shared:
            same = sum(answers[key_a][q] == answers[key_b][q] for q in shared)
            result[(key_a[0], key_b[0], *key_a[1:])] = (same, len(shared))
    return result


def _paired_cell(shared: int, reference_right: int, right: int) -> str:
    return f"{100.0 * (right - reference_right) / shared:+.1f} ({reference_right} → {right} of {shared})"


def _error_types(rows: list[dict[str, Any]]) -> dict[tuple, list[tuple[str, int]]]:
    counts: dict[tuple, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in rows:
        if not row["valid"] and row["mode"] != SC_FROM_VANILLA:  # its answer is one of the vanilla row's rounds
            counts[_group_key(row)][row.get("error_type") or "unknown"] += 1
    return {k: sorted(v.items(), key=lambda kv: -kv[1]) for k, v in counts.items()}


# ---------------------------------------------------------------------------------------------------- rounds


def round_curves(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, list[float]]]:
    """Accuracy (%) at r = 0..n refine rounds, per (label, mode, n) and category (plus "overall"), from histories.

    vanilla: round r's answer; self_consistency: the majority of rounds 1..r (r=0: the first answer); adaptive: the
    answer adaptive refinement returns when capped at r rounds (it stops at its first repeat, so the cap-r answer is
    round min(stop, r) of the same greedy trajectory).
    """
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["mode"] != RefineMode.NONE and row.get("history_valid"):
            groups[_group_key(row)].append(row)
    curves = {}
    for key, members in groups.items():
        mode, n = key[1], key[2]
        per_category: dict[str, list[list[bool]]] = defaultdict(list)
        for row in members:
            hv, mv = row["history_valid"], row.get("history_majority_valid") or row["history_valid"]
            stop = len(hv) - 1
            scores = mv if mode in (RefineMode.SELF_CONSISTENCY, SC_FROM_VANILLA) else hv
            per_category[row["category"]].append([scores[min(stop, r)] for r in range(n + 1)])
        result = {}
        for category, lists in per_category.items():
            result[category] = [100.0 * sum(p[r] for p in lists) / len(lists) for r in range(n + 1)]
        cats = [c for c in bfcl.SUPPORTED if c in result]
        result["overall"] = [sum(result[c][r] for c in cats) / len(cats) for r in range(n + 1)]
        curves[key] = result
    return curves


def plot_rounds(rows: list[dict[str, Any]], path: Path) -> Path | None:
    curves = round_curves(rows)
    baseline = {k[0]: v for k, v in table(rows).items() if k[1] == RefineMode.NONE}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = ["overall", *[c for c in bfcl.SUPPORTED if any(c in v for v in curves.values())]]
    cols = 3
    rows_n = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.3 * rows_n), squeeze=False)
    styles = {
        RefineMode.VANILLA: "o-",
        RefineMode.SELF_CONSISTENCY: "s--",
        SC_FROM_VANILLA: "s:",
        RefineMode.ADAPTIVE: "^-.",
    }
    for ax, panel in zip(axes.flat, panels, strict=False):
        for (label, mode, n), result in sorted(curves.items()):
            if panel in result:
                ax.plot(range(n + 1), result[panel], styles.get(mode, "x-"), label=f"{label}: {mode}", markersize=4)
        for s in baseline.values():
            value = s["overall"] if panel == "overall" else s["acc"].get(panel)
            if value is not None:
                ax.axhline(value, color="gray", linewidth=0.8, linestyle=":")
        ax.set_title(_HEADERS.get(panel, panel) if panel != "overall" else "Overall (mean of categories)")
        ax.set_xlabel("refine rounds (adaptive: the cap)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(-3, 103)
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize=8)
    fig.suptitle("BFCL accuracy against refine rounds (dotted: refine=none)")
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _request_rounds(row: dict[str, Any]) -> list[int]:
    """The refine rounds of each request a row made: one for a single-turn question; a multi-turn one's row holds
    their mean, so they come from its steps."""
    if "turns" in row:
        return [step["rounds"] for turn in row["turns"] for step in turn if step.get("rounds") is not None]
    return [] if row.get("rounds") is None else [row["rounds"]]


def plot_distribution(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """How many refine rounds each request used: adaptive's stopping point (vanilla/SC always use n)."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for row in rows:
        if row["mode"] == RefineMode.ADAPTIVE:
            groups[_group_key(row)].extend(_request_rounds(row))
    groups = {key: values for key, values in groups.items() if values}
    if not groups:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    keys = sorted(groups)
    width = 0.8 / len(keys)
    top = max(max(v) for v in groups.values())
    for i, key in enumerate(keys):
        values = groups[key]
        counts = [100.0 * values.count(r) / len(values) for r in range(top + 1)]
        ax.bar(
            [r + (i - (len(keys) - 1) / 2) * width for r in range(top + 1)],
            counts,
            width,
            label=f"{key[0]} (n={len(values)})",
        )
    ax.set_xticks(range(top + 1))
    ax.set_xlabel("refine rounds used by adaptive refinement (1 = the first refinement repeated the answer)")
    ax.set_ylabel("% of requests")
    ax.set_title("Adaptive refinement: where it stopped")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: Path) -> list[Path]:
    out = Path(out)
    rows = with_self_consistency_from_vanilla(load(out))
    if not rows:
        return []
    written = []
    summary = out / SUMMARY_FILE
    text = summary_markdown(rows)
    curves = round_curves(rows)
    if curves:
        text += "\nAccuracy (%, overall) at r refine rounds, from the refinement histories:\n\n"
        n_max = max(k[2] for k in curves)
        text += "| Model | Refine | " + " | ".join(f"r={r}" for r in range(n_max + 1)) + " |\n"
        text += "|" + "---|" * (n_max + 3) + "\n"
        for (label, mode, n), result in sorted(curves.items()):
            cells = [f"{v:.2f}" for v in result["overall"]] + ["–"] * (n_max - n)
            text += f"| {label} | {mode} | " + " | ".join(cells) + " |\n"
    summary.write_text(text, encoding="utf-8")
    written.append(summary)
    for plot, name in ((plot_rounds, ROUNDS_PLOT), (plot_distribution, DISTRIBUTION_PLOT)):
        path = plot(rows, out / name)
        if path:
            written.append(path)
    return written
