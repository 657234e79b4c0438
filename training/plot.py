"""The paper's Figure 2 for one run: held-out accuracy and selected amount per iteration."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_progress(state: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    iterations = [it for it in state.get("iterations", []) if it.get("heldout")]
    xs = [0] + [it["iteration"] for it in iterations]
    baseline = state.get("baseline") or {"exact": 0.0, "approx": 0.0}
    exact = [baseline["exact"]] + [it["heldout"]["exact"] for it in iterations]
    approx = [baseline["approx"]] + [it["heldout"]["approx"] for it in iterations]

    fig, accuracy_axis = plt.subplots(figsize=(6, 4))
    accuracy_axis.plot(xs, [100 * v for v in exact], "o-", label="held-out exact")
    accuracy_axis.plot(xs, [100 * v for v in approx], "s--", label="held-out ≈")
    accuracy_axis.set_xlabel("iteration (0 = base model)")
    accuracy_axis.set_ylabel("accuracy (%)")
    accuracy_axis.set_xticks(xs)
    selected_axis = accuracy_axis.twinx()
    selected = [(it["iteration"], it["selected"]) for it in state.get("iterations", []) if "selected" in it]
    if selected:
        selected_axis.bar(
            [x for x, _ in selected],
            [n for _, n in selected],
            width=0.3,
            alpha=0.25,
            color="gray",
            label="selected samples",
        )
    selected_axis.set_ylabel("selected samples")
    lines = accuracy_axis.get_legend_handles_labels()
    bars = selected_axis.get_legend_handles_labels()
    accuracy_axis.legend(lines[0] + bars[0], lines[1] + bars[1], loc="lower right", fontsize=8)
    accuracy_axis.set_title(f"ToolACE-R training: {state.get('config', {}).get('name', '')}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
