"""Push and pull a pipeline's artifacts through its DVC remote, the ones DVC does not push included.

    python -m stagewise.remote push [-r REMOTE]   # `dvc push`, then the uncached outputs
    python -m stagewise.remote pull [-r REMOTE]   # `dvc pull`, then the uncached outputs

`make push` / `make pull` call these. `dvc push` carries every cached output (manifests, decisions,
models, previews). It does not carry the outputs declared `cache: false` that git does not track either:
the latent cache `data/cache/<px>` (the only copy of the latents: DVC keeps no second one), the optimizer
state `runs/<stage>/state.safetensors` and the resume backups `runs/<stage>/backups`. Without them a
second machine's `dvc status` lists those stages as changed and `dvc repro` recomputes them: the whole
latent cache and every training stage. So this module carries them too, through the same remote:

- each file once, content-addressed by its md5, under ``<remote>/stagewise/files/`` (beside DVC's own
  ``files/md5/``, never mixed with it, so `dvc gc -c` leaves it alone);
- one index per output version, named by the hash dvc.lock records for it (``<remote>/stagewise/outs/
  <hash>.json``), so a pull restores exactly the version of the checked-out commit;
- a pull only fills outputs that are absent here, into a temp folder renamed into place: an existing
  folder is never overwritten or merged into.

A push refuses to run while `dvc status` shows changes: the uncached outputs must be the versions
dvc.lock names. The memo stores (`data/store/`) are not pipeline outputs and are not carried: a second
machine recomputes a per-image result only for images that are new to it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

PREFIX = "stagewise"


@dataclass(frozen=True)
class Uncached:
    path: str  # relative to the repository root, as in dvc.yaml
    lock_hash: str  # what dvc.lock records: md5 of the file, or "<md5>.dir" of a folder
    stage: str


class RemoteError(RuntimeError):
    pass


def dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, text=True, capture_output=True)
    if proc.returncode:
        raise RemoteError(f"dvc {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc


def uncached_outputs(root: Path) -> list[Uncached]:
    """Outputs declared ``cache: false`` that git does not track (absent ones too), with the hash dvc.lock records."""
    from dvc.repo import Repo

    found = []
    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            for out in stage.outs:
                if out.use_cache or not out.hash_info or not out.hash_info.value:
                    continue
                rel = os.path.relpath(out.fs_path, repo.root_dir)
                tracked = subprocess.run(["git", "ls-files", "--", rel], cwd=root, capture_output=True, text=True).stdout.strip()
                if not tracked:  # metrics, history and events are `cache: false` too, but committed
                    found.append(Uncached(rel, out.hash_info.value, stage.addressing))
    return found


def _remote(root: Path, name: str | None):
    from dvc.repo import Repo

    repo = Repo(str(root))
    try:
        remote = repo.cloud.get_remote(name, "push")
    except Exception as exc:  # noqa: BLE001 - DVC's own message says what is missing
        repo.close()
        raise RemoteError(f"{exc}. Add one: dvc remote add -d store <url> (README \"Artifacts on a DVC remote\")") from None
    return repo, remote.fs, remote.path


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(path: Path) -> dict[str, Path]:
    if path.is_file():
        return {"": path}
    return {p.relative_to(path).as_posix(): p for p in sorted(path.rglob("*")) if p.is_file()}


def push(root: Path, remote_name: str | None = None) -> list[str]:
    changed = json.loads(dvc("status", "--json", cwd=root).stdout or "{}")
    if changed:
        raise RemoteError(f"dvc status shows changes in {', '.join(sorted(changed))}: run `dvc repro` (or `dvc commit`) first, so the outputs pushed are the ones dvc.lock names")
    dvc("push", *(["-r", remote_name] if remote_name else []), cwd=root)
    repo, fs, base = _remote(root, remote_name)
    report = []
    try:
        for out in uncached_outputs(root):
            local = root / out.path
            if not local.exists():
                report.append(f"{out.path}: not here, not pushed")
                continue
            files = {rel: _md5(p) for rel, p in _files(local).items()}
            sent = 0
            for rel, md5 in files.items():
                target = fs.join(base, PREFIX, "files", md5[:2], md5[2:])
                if not fs.exists(target):
                    fs.makedirs(fs.parent(target), exist_ok=True)
                    fs.put_file(str(_files(local)[rel]), target)
                    sent += 1
            index = fs.join(base, PREFIX, "outs", out.lock_hash + ".json")
            fs.makedirs(fs.parent(index), exist_ok=True)
            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as tmp:
                json.dump({"path": out.path, "stage": out.stage, "files": files}, tmp, sort_keys=True)
            fs.put_file(tmp.name, index)
            os.unlink(tmp.name)
            report.append(f"{out.path}: {len(files)} file(s), {sent} new on the remote")
    finally:
        repo.close()
    return report


def pull(root: Path, remote_name: str | None = None) -> list[str]:
    dvc("pull", *(["-r", remote_name] if remote_name else []), cwd=root)
    repo, fs, base = _remote(root, remote_name)
    report = []
    try:
        for out in uncached_outputs(root):
            local = root / out.path
            if local.exists():
                report.append(f"{out.path}: exists here, left as is")
                continue
            index = fs.join(base, PREFIX, "outs", out.lock_hash + ".json")
            if not fs.exists(index):
                report.append(f"{out.path}: not on the remote (run `make push` on the machine that computed it); `dvc repro` will recompute {out.stage}")
                continue
            with tempfile.TemporaryDirectory() as tmp:
                fs.get_file(index, os.path.join(tmp, "index.json"))
                files = json.loads(Path(tmp, "index.json").read_text())["files"]
            local.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{local.name}.pull-", dir=local.parent))
            try:
                for rel, md5 in files.items():
                    dest = staging / "out" / rel if rel else staging / "out"
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    fs.get_file(fs.join(base, PREFIX, "files", md5[:2], md5[2:]), str(dest))
                    if _md5(dest) != md5:
                        raise RemoteError(f"{out.path}/{rel}: the remote's copy does not match its md5 {md5}")
                if not files:  # an empty folder
                    (staging / "out").mkdir()
                os.replace(staging / "out", local)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            report.append(f"{out.path}: {len(files)} file(s) pulled")
    finally:
        repo.close()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m stagewise.remote", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["push", "pull"])
    parser.add_argument("-r", "--remote", default=None, help="DVC remote name (default: the default remote, `dvc remote add -d`)")
    parser.add_argument("--project", default=".", help="the repository root (default: %(default)s)")
    args = parser.parse_args()
    try:
        lines = (push if args.action == "push" else pull)(Path(args.project).resolve(), args.remote)
    except RemoteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
