"""Where a benchmark result came from: the commit of the code that produced it and the machine
it ran on. `save_json` stamps every bench JSON with it, so a published table can be traced to
both.

    {"commit": "9881ea8...(-dirty)", "date": "...Z", "load_average": [1m, 5m, 15m],
     "machine": {"cpu", "cores", "memory_gib", "gpu", "python", "torch", "platform"}}

torch is never imported here (`bench sim-scale` runs without it): its version comes from the
package metadata, the GPU's name from torch only when the bench already imported it, else
from nvidia-smi.
"""

from __future__ import annotations

import datetime
import functools
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMIT_ENV = "PDSERVE_PROVENANCE_COMMIT"  # set by benchmarks/regenerate.py, whose own results dirty the tree


def provenance() -> dict:
    return {
        "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "machine": machine(),
    }


def commit() -> str:
    """HEAD of the checkout the code runs from, "-dirty" if tracked files differ from it ("unknown" outside git)."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    git = lambda *args: subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30)  # noqa: E731
    head = git("rev-parse", "HEAD")
    if head.returncode:
        return "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + ("-dirty" if dirty else "")


@functools.cache
def machine() -> dict:
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpu": _gpu_name(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "platform": platform.platform(),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_name() -> str | None:
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    names = out.stdout.strip().splitlines()
    return names[0] if out.returncode == 0 and names else None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
