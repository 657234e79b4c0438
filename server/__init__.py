"""ToolACE-R server: an OpenAI-compatible tool-calling server with adaptive self-refinement."""

import os

# Set before torch loads OpenMP (importing `server` comes first in the server, the training CLI and the tests).
# OpenMP's default spin-waiting makes every parallel torch op cost ~25 ms as soon as another process wants the same
# cores: measured on 2 cores, a 49k-element masked_fill took 24 ms instead of 0.05 ms.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
