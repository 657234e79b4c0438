"""ToolACE-R model-aware iterative training: `toolace-r train` turns a base model and tool-calling data into a LoRA
adapter in `adapters/<name>/`. See training/README.md.

data.py (loaders → Sample) → select.py (pass@k) → refine_data.py → sft.py (LoRA) → heldout.py, driven by loop.py;
config.py and cli.py around it. Reuses `server.engine`, `server.toolcalls` and `server.prompts`, never the HTTP layer.
"""
