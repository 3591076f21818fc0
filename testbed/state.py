"""On-disk state of live clusters, so every CLI call finds the cluster it acts on.

``/run/testbed/<cluster name>/`` holds ``cluster.json`` (the :class:`Cluster` model),
``run.json`` (run id, phase, pids) and the pod server's control socket and log.
``/run`` is a tmpfs: a reboot forgets clusters together with their namespaces.
The run directory is written *before* any kernel object is created, so a crash at any
point leaves enough behind for ``testbed clean``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from testbed.errors import StateError
from testbed.model import Cluster

RUN_ROOT = Path(os.environ.get("TESTBED_RUN_DIR", "/run/testbed"))


@dataclass
class RunInfo:
    name: str
    run_id: str
    phase: str = "building"  # building -> up -> stopping
    builder_pid: int = 0
    podserver_pid: int = 0
    created: float = field(default_factory=time.time)
    topology: str = ""


def run_dir(name: str) -> Path:
    return RUN_ROOT / name


def cluster_file(name: str) -> Path:
    return run_dir(name) / "cluster.json"


def control_socket(name: str) -> Path:
    return run_dir(name) / "podserver.sock"


def log_file(name: str) -> Path:
    return run_dir(name) / "podserver.log"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def create(info: RunInfo) -> Path:
    d = run_dir(info.name)
    d.mkdir(parents=True, exist_ok=False)
    save_info(info)
    return d


def save_info(info: RunInfo) -> None:
    _atomic_write(run_dir(info.name) / "run.json", json.dumps(asdict(info), indent=2))


def save_cluster(cluster: Cluster) -> None:
    _atomic_write(cluster_file(cluster.name), cluster.model_dump_json(indent=1))


def load_info(name: str) -> RunInfo | None:
    try:
        return RunInfo(**json.loads((run_dir(name) / "run.json").read_text()))
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None


def load_cluster(name: str) -> Cluster:
    try:
        return Cluster.model_validate_json(cluster_file(name).read_text())
    except FileNotFoundError:
        raise StateError(f"cluster {name!r} is not up (no {cluster_file(name)})") from None


def names() -> list[str]:
    try:
        return sorted(p.name for p in RUN_ROOT.iterdir() if p.is_dir())
    except FileNotFoundError:
        return []


def resolve(name: str | None) -> str:
    """The cluster a command acts on: the one named, or the only one that is up."""
    live = names()
    if name:
        if name not in live:
            raise StateError(f"cluster {name!r} is not up" + (f" (up: {', '.join(live)})" if live else ""))
        return name
    if not live:
        raise StateError("no cluster is up: start one with `testbed up TOPOLOGY`")
    if len(live) > 1:
        raise StateError(f"several clusters are up ({', '.join(live)}): name one with --name")
    return live[0]


def remove(name: str) -> None:
    shutil.rmtree(run_dir(name), ignore_errors=True)


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """Serialise commands that change one cluster (apply, scale, down...)."""
    d = run_dir(name)
    fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
