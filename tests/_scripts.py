"""Run a repository script's ``__main__`` in a fresh interpreter, as a user would, and see what it imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Sequence


def run_main(script: Path, argv: Sequence[str], watch: Sequence[str] = ("torch", "trl", "transformers"),
             timeout: float = 120):
    """``python script *argv`` through runpy in a fresh interpreter: (its exit status, its wall seconds, the
    modules of ``watch`` it imported, the finished process, whose stdout ends with one line of these)."""
    code = (
        "import json, runpy, sys, time\n"
        f"sys.argv = {[script.name, *argv]!r}\n"
        "began = time.perf_counter()\n"
        "status = 0\n"
        "try:\n"
        f"    runpy.run_path({str(script)!r}, run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    status = exit.code\n"
        f"print(json.dumps([status, time.perf_counter() - began, sorted(m for m in {list(watch)!r} if m in sys.modules)]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr
    status, seconds, loaded = json.loads(result.stdout.splitlines()[-1])
    return status, seconds, loaded, result
