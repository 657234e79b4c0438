"""`toolace-r bfcl` around BFCL's own runner: the subsets it hands the runner and the scores it reads back. The
runner itself (its own 2 GB environment) is run by hand; RESULTS.md has its numbers beside our harness's."""

from __future__ import annotations

import json
from pathlib import Path

from training.evaluation import bfcl, official


def test_the_runner_gets_our_fixed_subsets(tmp_path: Path) -> None:
    ids = official.write_ids(tmp_path, ["simple_python", "irrelevance"], 7, bfcl.DEFAULT_SEED)
    on_disk = json.loads((tmp_path / "test_case_ids_to_generate.json").read_text())
    assert on_disk == ids
    for category in ("simple_python", "irrelevance"):
        assert on_disk[category] == [q.id for q in bfcl.subset(category, 7)]
        assert len(on_disk[category]) == 7 and all(i.startswith(category) for i in on_disk[category])


def test_scores_are_read_from_the_runners_files(tmp_path: Path) -> None:
    folder = tmp_path / "score" / "gpt-4o-2024-11-20-FC" / "non_live"
    folder.mkdir(parents=True)
    for category, correct in (("simple_python", 12), ("parallel_multiple", 3)):
        head = {"accuracy": correct / 20, "correct_count": correct, "total_count": 20}
        wrong = {"id": f"{category}_5", "valid": False, "error_type": "ast_decoder:decoder_failed"}
        (folder / f"BFCL_v4_{category}_score.json").write_text(json.dumps(head) + "\n" + json.dumps(wrong) + "\n")
    scores = official.read_scores(tmp_path)
    assert scores == {
        "simple_python": {"accuracy": 0.6, "correct_count": 12, "total_count": 20},
        "parallel_multiple": {"accuracy": 0.15, "correct_count": 3, "total_count": 20},
    }
