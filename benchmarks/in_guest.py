"""Run a benchmark's Python script inside a fresh guest kernel (User-Mode Linux)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_script(script: str, args: list[str], *, name: str, timeout: float, mem: str) -> int:
    """Write ``script`` to a temporary file, run it with this Python inside a fresh guest
    (the project's directory as cwd and on PYTHONPATH), stream its output, remove the
    file; the guest's exit code (2 when there is no guest kernel here)."""
    sys.path.insert(0, str(ROOT))
    from testbed import guest

    if not guest.available():
        print("the guest kernel (user-mode-linux) is not installed", file=sys.stderr)
        return 2
    with tempfile.NamedTemporaryFile("w", suffix=".py", prefix=f"tb-{name}-", delete=False) as f:
        f.write(script)
    try:
        r = guest.run([sys.executable, f.name, *args], timeout=timeout, mem=mem, cwd=str(ROOT),
                      env={"PYTHONPATH": str(ROOT)}, stream=(sys.stdout.buffer, sys.stderr.buffer))
    finally:
        Path(f.name).unlink(missing_ok=True)
    return r.returncode
