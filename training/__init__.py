"""ToolACE-R model-aware iterative training (produces LoRA adapters into `adapters/`).

Not built yet: see the training issue. It will reuse `server.engine`, `server.toolcalls` and `server.prompts`.
"""
