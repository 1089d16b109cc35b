"""A local Dask scheduler and workers for the curation stages (params.yaml `cluster`), bound to 127.0.0.1.

    python -m flows.local_cluster start --workers 2   # `dask scheduler` + N `dask worker` processes
    python -m flows.local_cluster stop                # workers, then the scheduler
    python -m flows.local_cluster status

`make cluster` / `make cluster-stop` call these. Then set `cluster: {engine: dask, address:
tcp://127.0.0.1:8786}` in params.yaml and every per-image stage computes its new images on these
workers. Logs and pid files live in --home (default .stagewise/dask, git-ignored). Starting again
reuses a live scheduler and tops the workers up to --workers.

A worker on another machine joins with `dask worker tcp://<this machine>:8786 --nthreads 1`, run from
a checkout of the same code, with the project's folders (images, data/store) mounted at the same path;
the scheduler must then listen on an address that machine reaches (`--host` here), which is yours to
choose: nothing listens beyond 127.0.0.1 unless you say so.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from flows.local_server import _read_pid as read_pid, _spawn, _terminate

HOST = "127.0.0.1"
DEFAULT_PORT = 8786  # Dask's usual scheduler port, so its docs' commands work
DEFAULT_HOME = ".stagewise/dask"
START_TIMEOUT_S = 60  # a scheduler imports distributed and opens its port: ~3 s idle, more on busy cores


def _read_pid(pid_file: Path) -> int | None:
    """The pid in ``pid_file`` if that process is alive and is a Dask process (not a recycled pid)."""
    return read_pid(pid_file, b"dask")


def listening(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def env_for_workers() -> dict[str, str]:
    env = dict(os.environ)
    # The workers import the stages' code: this checkout first, whichever folder they were started from.
    env["PYTHONPATH"] = os.pathsep.join([str(Path.cwd()), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def start(home: Path, host: str, port: int, workers: int, threads: int) -> None:
    home.mkdir(parents=True, exist_ok=True)
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    address = f"tcp://{host}:{port}"
    if _read_pid(home / "scheduler.pid") is None:
        if listening(host, port):
            raise SystemExit(f"port {port} on {host} is in use by another program; choose another: make cluster DASK_PORT=<port>")
        # The scheduler does not reschedule a dead worker's task itself: the stage retries that shard once
        # and says which it was (stagewise.cluster.Cluster.map_shards).
        env = {**env_for_workers(), "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}
        _spawn([*dask, "--host", host, "--port", str(port), "--dashboard-address", f"{host}:0"], env, Path.cwd(), home / "scheduler.log", home / "scheduler.pid")
        deadline = time.monotonic() + START_TIMEOUT_S
        while not listening(host, port):
            if time.monotonic() > deadline or _read_pid(home / "scheduler.pid") is None:
                raise SystemExit(f"the scheduler did not start; see {home / 'scheduler.log'}")
            time.sleep(0.3)
        print(f"scheduler: started at {address} (log: {home / 'scheduler.log'})")
    else:
        print(f"scheduler: already running at {address}")
    for i in range(workers):
        pid_file = home / f"worker-{i}.pid"
        if (pid := _read_pid(pid_file)) is not None:
            print(f"worker {i}: already running (pid {pid})")
            continue
        args = [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", str(threads), "--nworkers", "1",
                "--host", host, "--dashboard-address", f"{host}:0", "--name", f"local-{i}"]
        pid = _spawn(args, env_for_workers(), Path.cwd(), home / f"worker-{i}.log", pid_file)
        print(f"worker {i}: started (pid {pid}, {threads} thread(s), log: {home / f'worker-{i}.log'})")
    print(f"set in params.yaml:  cluster: {{engine: dask, address: {address}}}")


def stop(home: Path) -> None:
    for pid_file in [*sorted(home.glob("worker-*.pid")), home / "scheduler.pid"]:
        name = pid_file.stem
        pid = _read_pid(pid_file)
        if pid is None:
            print(f"{name}: not running")
        else:
            print(f"{name}: stopped (pid {pid})" if _terminate(pid, [(signal.SIGTERM, 10), (signal.SIGKILL, 5)]) else f"{name}: pid {pid} did not stop")
        pid_file.unlink(missing_ok=True)


def status(home: Path, host: str, port: int) -> None:
    state = {"scheduler": {"address": f"tcp://{host}:{port}", "listening": listening(host, port), "pid": _read_pid(home / "scheduler.pid")}}
    state["workers"] = {p.stem: _read_pid(p) for p in sorted(home.glob("worker-*.pid"))}
    print(json.dumps(state, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--home", default=DEFAULT_HOME, help="logs and pid files (default: %(default)s)")
    parser.add_argument("--host", default=HOST, help="address the scheduler and workers listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="scheduler port (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="threads per worker (default: %(default)s)")
    args = parser.parse_args()
    home = Path(args.home).resolve()
    if args.action == "start":
        start(home, args.host, args.port, args.workers, args.threads)
    elif args.action == "stop":
        stop(home)
    else:
        status(home, args.host, args.port)


if __name__ == "__main__":
    main()
