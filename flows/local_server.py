"""A local Prefect server and process worker for this project, bound to 127.0.0.1.

    python -m flows.local_server start   # server, work pool, deployments from prefect.yaml, worker
    python -m flows.local_server stop    # worker (two SIGTERMs), then server
    python -m flows.local_server status

`make serve` / `make stop` call these. Every step is idempotent: a healthy server on the port is
reused, an existing pool is kept, `prefect deploy` updates the deployments in place, a live worker
is left alone. Server database, logs and pid files live in --home (default .stagewise/prefect, git-
ignored), so the user's ~/.prefect is untouched.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"  # never listen beyond this machine
POOL = "stagewise"  # the process work pool the deployments in prefect.yaml name
DEFAULT_PORT = 4200  # Prefect's usual port, so its docs' URLs work
DEFAULT_HOME = ".stagewise/prefect"
SERVER_START_TIMEOUT_S = 120  # a first start migrates the SQLite database: ~20 s on 2 busy cores
# The worker asks the server for scheduled runs this often; Prefect's 15 s default makes a
# `prefect deployment run` wait visibly before anything happens.
WORKER_POLL_S = "5"


def api_url(port: int) -> str:
    return f"http://{HOST}:{port}/api"


def prefect_env(home: Path, port: int) -> dict[str, str]:
    """Environment for every Prefect process of this project: its own home, its own server, no telemetry."""
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api_url(port),
        PREFECT_SERVER_API_HOST=HOST,
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_WORKER_QUERY_SECONDS=WORKER_POLL_S,
        # The worker's flow runs start `dvc` and the stages: this interpreter's bin folder goes first.
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    return env


def healthy(port: int, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url(port)}/health", timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex((HOST, port)) == 0


def _alive(pid: int) -> bool:
    try:
        if os.waitpid(pid, os.WNOHANG)[0]:  # our own child that has exited: reap it (no zombie)
            return False
    except ChildProcessError:  # not our child: its parent or init reaps it
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(pid_file: Path, program: bytes = b"prefect") -> int | None:
    """The pid in ``pid_file`` if that process is alive and runs ``program`` (not a recycled pid)."""
    try:
        pid = int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    if not _alive(pid):
        return None
    try:  # Linux: a recycled pid runs something else (empty while the process is still exec'ing)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return pid
    return pid if not cmdline or program in cmdline else None


def _spawn(args: list[str], env: dict, cwd: Path, log_file: Path, pid_file: Path) -> int:
    """Start a long-lived process in its own session (so stop() can end it and its children) with its
    output appended to ``log_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    pid_file.write_text(str(proc.pid))
    return proc.pid


def _prefect(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefect", *args], cwd=cwd, env=env, capture_output=True, text=True)


def _pool_exists(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url(port)}/work_pools/{POOL}", timeout=10) as response:
            return response.status == 200
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return False
        raise


def start_server(home: Path, port: int, project: Path) -> str:
    if healthy(port):
        return f"server: already running at http://{HOST}:{port}"
    pid_file = home / "server.pid"
    if _read_pid(pid_file) is None:
        if port_in_use(port):
            raise SystemExit(f"error: port {port} on {HOST} is in use by another program; choose another with PREFECT_PORT=<port>")
        _spawn([sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)], prefect_env(home, port), project, home / "server.log", pid_file)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while not healthy(port):
        if _read_pid(pid_file) is None:
            raise SystemExit(f"error: the Prefect server exited during start-up; see {home / 'server.log'}")
        if time.monotonic() > deadline:
            raise SystemExit(f"error: the Prefect server did not answer within {SERVER_START_TIMEOUT_S} s; see {home / 'server.log'}")
        time.sleep(0.5)
    return f"server: started at http://{HOST}:{port} (log: {home / 'server.log'})"


def ensure_pool(home: Path, port: int, project: Path) -> str:
    if _pool_exists(port):
        return f"work pool: {POOL!r} exists"
    proc = _prefect("work-pool", "create", POOL, "--type", "process", env=prefect_env(home, port), cwd=project)
    if proc.returncode != 0 and not _pool_exists(port):  # a concurrent `make serve` may have created it
        raise SystemExit(f"error: could not create work pool {POOL!r}:\n{proc.stdout}{proc.stderr}")
    return f"work pool: {POOL!r} created"


def deploy(home: Path, port: int, project: Path) -> str:
    """`prefect deploy --all` from prefect.yaml; re-deploying updates the deployments in place."""
    proc = _prefect("--no-prompt", "deploy", "--all", env=prefect_env(home, port), cwd=project)
    if proc.returncode != 0:
        raise SystemExit(f"error: prefect deploy failed:\n{proc.stdout}{proc.stderr}")
    return "deployments: progressive-train/default, curate/default (from prefect.yaml)"


def start_worker(home: Path, port: int, project: Path) -> str:
    pid_file = home / "worker.pid"
    if (pid := _read_pid(pid_file)) is not None:
        return f"worker: already running (pid {pid})"
    pid = _spawn([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--name", f"{POOL}-local"], prefect_env(home, port), project, home / "worker.log", pid_file)
    return f"worker: started (pid {pid}, log: {home / 'worker.log'})"


def start(home: Path, port: int, project: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    for step in (start_server, ensure_pool, deploy, start_worker):
        print(step(home, port, project), flush=True)
    print(f"\nUI: http://{HOST}:{port}\nThen, in a shell:\n  export PREFECT_API_URL={api_url(port)}\n  prefect deployment run progressive-train/default --watch")


def _terminate(pid: int, signals: list[tuple[int, float]]) -> bool:
    """Send each (signal, wait_s) to ``pid``'s process group until it is gone; True when it is."""
    for sig, wait_s in signals:
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not _alive(pid):
                return True
            time.sleep(0.2)
    return False


def stop(home: Path) -> None:
    # The worker finishes its graceful shutdown only on a second SIGTERM; SIGKILL if it still hangs.
    for name, signals in (("worker", [(signal.SIGTERM, 3), (signal.SIGTERM, 15), (signal.SIGKILL, 5)]), ("server", [(signal.SIGTERM, 20), (signal.SIGKILL, 5)])):
        pid_file = home / f"{name}.pid"
        pid = _read_pid(pid_file)
        if pid is None:
            print(f"{name}: not running")
        else:
            print(f"{name}: stopped (pid {pid})" if _terminate(pid, signals) else f"{name}: pid {pid} did not stop")
        pid_file.unlink(missing_ok=True)


def status(home: Path, port: int) -> None:
    state = {
        "server": {"url": f"http://{HOST}:{port}", "healthy": healthy(port), "pid": _read_pid(home / "server.pid")},
        "worker": {"pid": _read_pid(home / "worker.pid")},
    }
    print(json.dumps(state, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--home", default=os.environ.get("PREFECT_LOCAL_HOME", DEFAULT_HOME), help="server database, logs and pid files (default: %(default)s)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PREFECT_PORT", DEFAULT_PORT)), help="server port on 127.0.0.1 (default: %(default)s)")
    parser.add_argument("--project", default=".", help="the project with prefect.yaml (default: %(default)s)")
    args = parser.parse_args()
    home, project = Path(args.home).resolve(), Path(args.project).resolve()
    if args.action == "start":
        start(home, args.port, project)
    elif args.action == "stop":
        stop(home)
    else:
        status(home, args.port)


if __name__ == "__main__":
    main()
