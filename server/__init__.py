"""ToolACE-R server: an OpenAI-compatible tool-calling server with adaptive self-refinement."""

__version__ = "0.1.0"
