"""The kill harness: run a real `dvc repro` in its own session, SIGKILL it at a chosen moment, and look at
what is left on disk. Shared by tests/test_fault_kill.py (fixed moments) and benchmarks/fault_kill.py
(random ones, several trials).

Moments come from the files the pipeline writes, never from its console output: the creation of the k-th
temp file of a shard or backup write (inotify), a stage's complete backups, and its ``events.jsonl``
(``started`` / ``resumed``: where a run continued from). Temp-file names are the modules' own
(``stagewise.io.partial_write_pattern``, ``stagewise.train.checkpoint.partial_write``). The one console
line read is DVC's ``Running stage '...'``: which DVC stage a kill landed in.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import random
import re
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import torch
import yaml
from safetensors.torch import load_file

from stagewise.io import partial_write_pattern
from stagewise.latents import SHARD_GLOB
from stagewise.train import checkpoint as ckpt
from stagewise.train.schedule import next_point

SHARD_TEMP = partial_write_pattern(SHARD_GLOB).match  # one per shard the cache writes


def backup_temp(name: str) -> bool:
    """The two creations of one backup save: safetensors' .tmpXXXXXX (renamed, not created, into
    stagewise.io's temp name), then the JSON's stagewise.io temp file."""
    return bool(ckpt.SAFETENSORS_TMP.match(name) or partial_write_pattern("*.json").match(name))


def dvc_env() -> dict[str, str]:
    # One torch thread per stage: on 2 cores shared with other work, torch's default (a thread per core)
    # spins on busy cores and made the GAN stage ~25x slower (27 s instead of 1 s for 120 images).
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {**os.environ, "PATH": path, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


# ------------------------------------------------------------------------------------ processes


class Repro:
    """`dvc repro` in its own session (so the stage it runs dies with it), output to a log file."""

    def __init__(self, project: Path, log: Path, *args: str):
        self.project, self.log_path = project, log
        self._log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", *args], cwd=project, env=dvc_env(), stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> bool:
        """SIGKILL the whole process group; False when it had already ended."""
        killed = self.proc.poll() is None  # asked before the signal: after it, poll() may already reap the group leader
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.wait()
        with contextlib.suppress(ProcessLookupError):  # a grandchild that outlived its parent
            os.killpg(self.proc.pid, signal.SIGKILL)
        return killed

    def wait(self, timeout: float | None = None) -> int:
        rc = self.proc.wait(timeout)
        self._log.close()
        return rc

    def running_stage(self) -> str | None:
        found = re.findall(r"Running stage '([^']+)'", self.log())
        return found[-1] if found else None


def wait_until(predicate, repro: Repro, timeout: float = 300, every: float = 0.005):
    """Poll ``predicate`` until it is truthy (returned) or the run ends (None)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        if not repro.alive():
            return predicate() or None
        time.sleep(every)
    raise TimeoutError("condition not reached")


class CreateWatch:
    """Counts files created in ``folder`` whose names ``matches`` accepts: inotify on Linux (a kill then lands
    within microseconds of the creation), else a 1 ms poll of the folder."""

    IN_CREATE, IN_NONBLOCK, IN_CLOEXEC = 0x100, 0o4000, 0o2000000

    def __init__(self, folder: Path, matches: Callable[[str], object]):
        self.folder, self.matches, self.count, self.fd = folder, matches, 0, None
        self._seen: set[str] = set()
        libc_name = ctypes.util.find_library("c")
        try:
            self.libc = ctypes.CDLL(libc_name, use_errno=True)
            fd = self.libc.inotify_init1(self.IN_NONBLOCK | self.IN_CLOEXEC)
            self.fd = fd if fd >= 0 else None
        except (OSError, AttributeError):
            self.fd = None
        self.watching = False

    def _attach(self) -> bool:
        if self.watching:
            return True
        if not self.folder.is_dir():
            return False
        if self.fd is not None and self.libc.inotify_add_watch(self.fd, os.fsencode(self.folder), self.IN_CREATE) < 0:
            self.fd = None
        self.watching = True
        return True

    def _poll(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(BlockingIOError):
                data = os.read(self.fd, 65536)
                offset = 0
                while offset < len(data):
                    _, _, _, length = struct.unpack_from("iIII", data, offset)
                    name = data[offset + 16 : offset + 16 + length].rstrip(b"\0").decode()
                    offset += 16 + length
                    if self.matches(name):
                        self.count += 1
        else:
            with contextlib.suppress(FileNotFoundError):
                for name in os.listdir(self.folder):
                    if self.matches(name) and name not in self._seen:
                        self._seen.add(name)
                        self.count += 1

    def wait(self, k: int, repro: Repro, timeout: float = 300) -> bool:
        """True once the k-th matching creation is seen; False if the run ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._attach():
                if self.fd is not None:
                    select.select([self.fd], [], [], 0.05)
                else:
                    time.sleep(0.001)
                self._poll()
                if self.count >= k:
                    return True
            else:
                time.sleep(0.002)
            if not repro.alive():
                return False
        raise TimeoutError(f"{self.folder}: no {k} creations")

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# ------------------------------------------------------------------------------------------ checks


def temp_files(project: Path) -> list[Path]:
    """Temp files of writes in progress or interrupted, under data/ and runs/."""
    return [p for folder in ("data", "runs") for p in project.joinpath(folder).rglob(".*") if ckpt.partial_write(p.name)]


def corrupted_files(project: Path) -> list[str]:
    """Every output a reader would take that does not read whole: Parquet, safetensors, JSON/JSONL, dvc.lock."""
    bad = []

    def check(path: Path, read) -> None:
        try:
            read(path)
        except Exception as exc:  # noqa: BLE001 -- any failure to read is the finding
            bad.append(f"{path.relative_to(project)}: {type(exc).__name__}: {exc}")

    def tensors(path: Path) -> None:
        for name, t in load_file(str(path)).items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"{name} holds NaN/inf")

    def jsonl(path: Path) -> None:
        for line in path.read_text().splitlines():
            json.loads(line)

    for path in project.joinpath("data").rglob("*.parquet"):
        check(path, pq.read_table)
    runs = project / "runs"
    for path in runs.rglob("*.safetensors"):
        check(path, tensors)
    for path in runs.rglob("*.json"):
        check(path, lambda p: json.loads(p.read_text()))
    for path in runs.rglob("*.jsonl"):
        check(path, jsonl)
    if (project / "dvc.lock").exists():
        check(project / "dvc.lock", lambda p: yaml.safe_load(p.read_text()))
    return bad


def complete_backups(backups: Path) -> list[int]:
    """images_seen of every complete backup (JSON present, parses, tensors beside it)."""
    out = []
    for path in backups.glob("*/*.json"):
        if match := ckpt.BACKUP_NAME.match(path.name):
            with contextlib.suppress(ValueError, OSError):
                json.loads(path.read_text())
                if path.with_suffix(".safetensors").exists():
                    out.append(int(match[2]))
    return sorted(out)


def incomplete_backups(backups: Path) -> int:
    """Backups whose tensors were written but whose JSON was not (a kill between the two writes)."""
    return sum(1 for p in backups.glob("*/*.safetensors") if ckpt.BACKUP_NAME.match(p.with_suffix(".json").name) and not p.with_suffix(".json").exists())


def cache_rows(project: Path, resolution: int = 16) -> dict[tuple[str, bool], bytes]:
    """The latent cache as {(sha256, flipped): latent bytes}; raises on a duplicated key."""
    rows: dict[tuple[str, bool], bytes] = {}
    for shard in sorted((project / "data" / "cache" / str(resolution)).glob(SHARD_GLOB)):
        table = pq.read_table(shard, columns=["sha256", "flipped", "latent"]).to_pydict()
        for sha, flipped, latent in zip(table["sha256"], table["flipped"], table["latent"]):
            if (sha, flipped) in rows:
                raise AssertionError(f"cache key ({sha[:12]}, flipped={flipped}) is in more than one row ({shard.name})")
            rows[(sha, flipped)] = latent
    return rows


def stage_results(project: Path, stages: list[str]) -> dict[str, tuple[int, dict[str, torch.Tensor]]]:
    out = {}
    for stage in stages:
        meta = json.loads((project / "runs" / stage / "meta.json").read_text())
        out[stage] = (meta["images_seen"], load_file(str(project / "runs" / stage / "model.safetensors")))
    return out


def same_result(project: Path, reference: dict, ref_cache: dict) -> list[str]:
    """What differs from the uninterrupted run (empty: nothing)."""
    problems = []
    try:
        cache = cache_rows(project)
    except AssertionError as exc:
        problems.append(str(exc))
        cache = None
    if cache is not None and cache != ref_cache:
        problems.append(f"cache: {len(cache)} rows vs the reference's {len(ref_cache)}, or different latents")
    for stage, (images, weights) in reference.items():
        try:
            got_images, got_weights = stage_results(project, [stage])[stage]
        except (FileNotFoundError, KeyError, ValueError) as exc:
            problems.append(f"{stage}: {exc}")
            continue
        if got_images != images:
            problems.append(f"{stage}: images_seen {got_images} vs the reference's {images}")
        if got_weights.keys() != weights.keys() or not all(torch.equal(got_weights[k], weights[k]) for k in weights):
            problems.append(f"{stage}: weights differ from the reference's")
    return problems


# ------------------------------------------------------------------------------------------ events


def stage_events(project: Path, stage: str) -> list[dict]:
    """The stage's events.jsonl (written atomically: whole or absent)."""
    path = project / "runs" / stage / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def events_mark(project: Path, stage: str) -> tuple[int, int, int] | None:
    """Identifies one write of events.jsonl: every run of a stage rewrites it as it starts (``started`` or
    ``resumed``), so a different mark means the stage has run since."""
    with contextlib.suppress(FileNotFoundError):
        st = (project / "runs" / stage / "events.jsonl").stat()
        return st.st_ino, st.st_mtime_ns, st.st_size
    return None


def resume_point(events: list[dict]) -> int | None:
    """Images the latest run continued from: its ``resumed`` event's from_kimg, or 0 for ``started``."""
    last = next((e for e in reversed(events) if e["event"] in ("started", "resumed")), None)
    if last is None:
        return None
    return 0 if last["event"] == "started" else round(last["from_kimg"] * 1000)


# ------------------------------------------------------------------------------------------- kills


@dataclass
class Kill:
    trial: int
    phase: str  # cache / step / save: what was aimed at
    landed_in: str | None = None  # the DVC stage running when it landed
    killed: bool = False  # False: the run had ended before the moment came
    target_stage: str | None = None  # training kills: the recipe stage
    inside_write: bool = False  # a temp file or a backup without its JSON was left
    newest_backup: int | None = None  # images_seen of the newest complete backup at the kill
    resumed_from: int | None = None
    lost: int | None = None  # an upper bound: see settle_training_kill
    events_at_kill: tuple[int, int, int] | None = None  # the stage's events.jsonl write at the kill (events_mark)
    corrupted: list[str] = field(default_factory=list)
    recovered: bool = False


@dataclass
class Setup:
    stages: list[str]  # recipe stages, in order
    lengths: dict[str, int]  # images per stage
    interval: int  # images between rolling backups
    shards: int  # shards an uninterrupted cache run writes
    train_seconds: dict[str, float]  # how long each stage trains (from its started event to its finished event)
    step: int = 8  # images per training step (both domains)


def kill_once(trial: int, phase: str, repro: Repro, project: Path, setup: Setup, rng: random.Random, stage: str | None, nth: int | None = None) -> Kill:
    """Wait for the phase's moment in ``repro``, SIGKILL it, and look at what is left on disk. ``nth``: kill at
    that temp-file creation (cache: shard, save: backup) instead of a random one."""
    if phase == "save":  # the first stage from ``stage`` on that has a save still to come
        later = setup.stages[setup.stages.index(stage) :]
        stage = next((s for s in later if (complete_backups(project / "runs" / s / "backups") or [-1])[-1] < setup.lengths[s]), None)
    kill = Kill(trial, phase, target_stage=stage)
    temps_before = {p.name for p in temp_files(project)}
    incomplete_before = incomplete_backups(project / "runs" / stage / "backups") if stage else 0
    hit = False
    if phase == "cache":
        watch = CreateWatch(project / "data" / "cache" / "16", SHARD_TEMP)
        hit = watch.wait(nth or rng.randint(1, setup.shards), repro)
        watch.close()
        if hit:
            time.sleep(rng.uniform(0, 0.004))
    elif phase == "step":  # a random moment of the stage's training in this run
        backups, before = project / "runs" / stage / "backups", events_mark(project, stage)
        done = complete_backups(backups)
        target = rng.randrange(done[-1] if done else 0, setup.lengths[stage])
        last_save = target // setup.interval * setup.interval  # the backup before the target, then a random part of an interval
        if wait_until(lambda: events_mark(project, stage) != before and (complete_backups(backups) or [-1])[-1] >= last_save, repro):
            time.sleep(rng.uniform(0, setup.train_seconds[stage] * setup.interval / setup.lengths[stage]))
            hit = True
    elif stage is not None:  # save: the k-th backup temp file of this run (2 per save: tensors, then JSON)
        backups = project / "runs" / stage / "backups"
        folder = wait_until(lambda: next((p for p in backups.glob("*") if p.is_dir()), None) if backups.is_dir() else None, repro, every=0.002)
        if folder:
            watch = CreateWatch(folder, backup_temp)
            done = complete_backups(backups)
            saves_left = max(1, -(-(setup.lengths[stage] - (done[-1] if done else 0)) // setup.interval)) + (0 if done else 1)
            hit = watch.wait(nth or rng.randint(1, 2 * saves_left), repro)
            watch.close()
            if hit:
                time.sleep(rng.uniform(0, 0.002))
    kill.landed_in = repro.running_stage()
    if hit:
        kill.killed = repro.kill()
    else:  # the run ended before the moment came
        repro.wait()
    if stage:
        backups = project / "runs" / stage / "backups"
        done = complete_backups(backups)
        kill.newest_backup = done[-1] if done else None
        kill.inside_write = incomplete_backups(backups) > incomplete_before
        kill.events_at_kill = events_mark(project, stage)
    kill.inside_write |= bool({p.name for p in temp_files(project)} - temps_before)
    kill.corrupted = corrupted_files(project)
    return kill


def settle_training_kill(kill: Kill, project: Path, setup: Setup) -> None:
    """Fill in the resume point and the progress lost, once the stage has run again after the kill.

    Progress lost: the trainer keeps its progress in memory; on disk there is only the newest complete
    backup B (JSON written last) at the kill. The trainer had not finished the save after B, so it had seen
    at most min(B + save interval, stage length) images. Progress lost is that bound minus the images the
    next run resumed from (its ``resumed`` event): an upper bound, and it is <= one save interval exactly
    when the run resumed from the newest complete backup (or later)."""
    stage = kill.target_stage
    if stage is None or kill.resumed_from is not None or events_mark(project, stage) == kill.events_at_kill:
        return  # not a training kill, settled already, or the stage has not run since
    kill.resumed_from = resume_point(stage_events(project, stage))
    if kill.resumed_from is not None:
        # The save after B is due at the schedule's next save point and made at the first step boundary there.
        due = int(next_point(kill.newest_backup or 0, setup.interval / 1000))
        reached = min(-(-due // setup.step) * setup.step, setup.lengths[kill.target_stage])
        kill.lost = max(0, reached - kill.resumed_from)
