"""BFCL evaluation through the HTTP API clients use (issue 10).

`bfcl` loads BFCL's questions and answers and scores answers with BFCL's own AST checker; `runner` sends the
questions to any OpenAI-compatible server and writes one JSONL row per question; `report` turns the rows into the
paper-style summary table and the rounds plots; `cli` is `toolace-r eval`.
"""
