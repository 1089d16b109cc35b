"""Kill tests: SIGKILL a real `dvc repro` of the tiny pipeline at random moments, run it again, check it.

Each trial is a fresh copy of the tiny project (tests/tiny_pipeline.py: pixels codec, 16 px, recipe
lrd -> gan) whose curation has already run. One `dvc repro` chain per trial, with one kill per phase:

  cache   `dvc repro` is killed while `cache@16` writes its Parquet shards: at the creation of the k-th
          shard temp file (k random), plus a random 0-4 ms;
  step    the next `dvc repro` is killed a random time into a training stage (lrd or gan, random);
  save    the next one is killed inside a checkpoint save: at the creation of the k-th backup temp file
          (k random; safetensors or JSON), plus a random 0-2 ms;

then `dvc repro` runs to the end. The whole process group is killed (DVC and the stage it runs). After
every kill, before the next run, and again at the end:

  * every Parquet file under data/ reads whole, every *.safetensors under runs/ loads with all tensors
    finite, every JSON / JSONL under runs/ parses, dvc.lock parses (a temp file of an interrupted write
    is not an output, and is only counted, as "temp files left");
  * at the end the chain's last run completed, `dvc status` is clean, every stage's images_seen equals
    an uninterrupted reference run's (and its weights are bit-identical), and the latent cache has each
    (sha256, flipped) key once, the reference's row count, and the reference's latent bytes per key.

Progress lost by a training kill. The trainer keeps its progress in memory; on disk there is only the
newest complete backup B (JSON written last) at the kill. The trainer had not finished the save after B,
so it had seen at most min(B + save interval, stage length) images. Progress lost is that bound minus the
images the next run resumed from (its `resumed` event): an upper bound, and it is <= one save interval
exactly when the run resumed from the newest complete backup (or later).

    python benchmarks/fault_kill.py [--trials 2] [--seed 0] [--workdir DIR] [--keep]

Prints one line per kill and a table: phase, kills, recovered, corrupted files, max progress lost (images)
vs the save interval, how many kills landed inside a write (a temp file left, or a backup without its
JSON), and the total wall time.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import ctypes
import ctypes.util
import json
import os
import random
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

# Temp names: stagewise.io's .<name>.tmp-<pid>-<hex>, and safetensors' own .tmpXXXXXX (save_file writes
# that, then renames it to stagewise.io's temp name, which is then fsynced and renamed into place).
TMP = re.compile(r"^(\..+\.tmp-\d+-[0-9a-f]{8}|\.tmp[A-Za-z0-9_]{6})$")
SHARD_TMP = re.compile(r"^\.shard-\d+\.parquet\.tmp-")
BACKUP_TMP = re.compile(r"^(\.(rolling|start|end)-\d{12}\.json\.tmp-|\.tmp[A-Za-z0-9_]{6}$)")  # one of each per save

# The benchmark's settings on top of the tiny config: shards of ~2 rows (so the cache writes a dozen of
# them) and training stages long enough to hold several rolling backups.
SAVE_EVERY_KIMG = 0.016  # two steps of 8 images (4 per domain): saves fall exactly on the interval
BENCH_PARAMS = {
    "cache": {"shard_mb": 0.003, "batch_size": 2, "workers": 1},
    "train": {
        "defaults": {"save_every_kimg": SAVE_EVERY_KIMG, "log_every_kimg": 0.02},
        "stages": {"lrd": {"length_kimg": 0.24}, "gan": {"length_kimg": 0.12}},
    },
}


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
    """Counts files created in ``folder`` whose names match ``pattern``: inotify on Linux (a kill then lands
    within microseconds of the creation), else a 1 ms poll of the folder."""

    IN_CREATE, IN_NONBLOCK, IN_CLOEXEC = 0x100, 0o4000, 0o2000000

    def __init__(self, folder: Path, pattern: re.Pattern):
        self.folder, self.pattern, self.count, self.fd = folder, pattern, 0, None
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
                    if self.pattern.match(name):
                        self.count += 1
        else:
            with contextlib.suppress(FileNotFoundError):
                for name in os.listdir(self.folder):
                    if self.pattern.match(name) and name not in self._seen:
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
    return [p for p in project.joinpath("data").rglob(".*") if TMP.match(p.name)] + [p for p in project.joinpath("runs").rglob(".*") if TMP.match(p.name)]


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
    for path in backups.glob("*/*-????????????.json"):
        with contextlib.suppress(ValueError, OSError):
            json.loads(path.read_text())
            if path.with_suffix(".safetensors").exists():
                out.append(int(path.stem.split("-")[1]))
    return sorted(out)


def incomplete_backups(backups: Path) -> int:
    """Backups whose tensors were written but whose JSON was not (a kill between the two writes)."""
    return sum(1 for p in backups.glob("*/*-????????????.safetensors") if not p.with_suffix(".json").exists())


def cache_rows(project: Path, resolution: int = 16) -> dict[tuple[str, bool], bytes]:
    """The latent cache as {(sha256, flipped): latent bytes}; raises on a duplicated key."""
    rows: dict[tuple[str, bool], bytes] = {}
    for shard in sorted((project / "data" / "cache" / str(resolution)).glob("shard-*.parquet")):
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


def progress_bar(log: str, stage: str) -> int | None:
    """Images seen by ``stage`` by its last progress-bar update in ``log`` (tqdm, at most 0.1 s old)."""
    found = re.findall(rf"(?:^|[\r\n]){re.escape(stage)}:\s+\d+%\|[^|]*\|\s*(\d+)/\d+", log)
    return int(found[-1]) if found else None


def resume_point(log: str, stage: str) -> int | None:
    """Images the first `<stage>: resumed|started` of a run's log continued from (started: 0)."""
    match = re.search(rf"\b{re.escape(stage)}: (resumed|started) (\{{.*\}})", log)
    if not match:
        return None
    return 0 if match[1] == "started" else round(ast.literal_eval(match[2])["from_kimg"] * 1000)


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
    lost: int | None = None  # upper bound, see the module docstring
    bar: int | None = None  # images on the stage's progress bar at the kill (a lower bound, <= 0.1 s stale)
    corrupted: list[str] = field(default_factory=list)
    recovered: bool = False


@dataclass
class Setup:
    stages: list[str]  # recipe stages, in order
    lengths: dict[str, int]  # images per stage
    interval: int  # images between rolling backups
    shards: int  # shards an uninterrupted cache run writes
    train_seconds: dict[str, float]  # how long each stage trains (from its started line to its finished line)
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
        watch = CreateWatch(project / "data" / "cache" / "16", SHARD_TMP)
        hit = watch.wait(nth or rng.randint(1, setup.shards), repro)
        watch.close()
        if hit:
            time.sleep(rng.uniform(0, 0.004))
    elif phase == "step":  # once the stage's progress bar shows a random number of images, plus 0-0.1 s
        done = complete_backups(project / "runs" / stage / "backups")
        target = rng.randrange(done[-1] if done else 0, setup.lengths[stage])
        if wait_until(lambda: (progress_bar(repro.log(), stage) or -1) >= target, repro):
            time.sleep(rng.uniform(0, 0.1))
            hit = True
    elif stage is not None:  # save: the k-th backup temp file of this run (2 per save: tensors, then JSON)
        backups = project / "runs" / stage / "backups"
        folder = wait_until(lambda: next((p for p in backups.glob("*") if p.is_dir()), None) if backups.is_dir() else None, repro, every=0.002)
        if folder:
            watch = CreateWatch(folder, BACKUP_TMP)
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
        kill.bar = progress_bar(repro.log(), stage)
    kill.inside_write |= bool({p.name for p in temp_files(project)} - temps_before)
    kill.corrupted = corrupted_files(project)
    return kill


def settle_training_kill(kill: Kill, log: str, setup: Setup) -> None:
    """Fill in the resume point and the progress lost, from the log of the run after the kill."""
    if kill.target_stage is None or kill.resumed_from is not None:
        return
    kill.resumed_from = resume_point(log, kill.target_stage)
    if kill.resumed_from is not None:
        # The save after B is due at the next multiple of the interval and made at the first step boundary there.
        due = ((kill.newest_backup or 0) // setup.interval + 1) * setup.interval
        reached = min(-(-due // setup.step) * setup.step, setup.lengths[kill.target_stage])
        kill.lost = max(0, reached - kill.resumed_from)


# ----------------------------------------------------------------------------------------- trials


def prepare(base: Path) -> Path:
    """The tiny project with the benchmark's settings, curation already run."""
    from conftest import set_params
    from tiny_pipeline import make_tiny_project

    project = make_tiny_project(base)
    set_params(project / "params.yaml", BENCH_PARAMS)
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "caption"], cwd=project, env=dvc_env(), capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"curation failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return project


def recipe(project: Path) -> tuple[list[str], dict[str, int], int]:
    params = yaml.safe_load((project / "params.yaml").read_text())
    stages = list(params["train"]["stages"])
    lengths = {s: round(params["train"]["stages"][s]["length_kimg"] * 1000) for s in stages}
    return stages, lengths, round(params["train"]["defaults"]["save_every_kimg"] * 1000)


def reference_run(project: Path, logs: Path) -> tuple[Setup, dict, dict]:
    """One uninterrupted `dvc repro`, timing each training stage from the outside."""
    stages, lengths, interval = recipe(project)
    repro = Repro(project, logs / "reference.log")
    marks: dict[str, float] = {}
    while repro.alive():
        text = repro.log()
        for stage in stages:
            for what in ("started", "finished"):
                if f"{stage}: {what} " in text and (stage, what) not in marks:
                    marks[(stage, what)] = time.monotonic()
        time.sleep(0.01)
    if repro.wait():
        raise SystemExit(f"reference run failed:\n{repro.log()[-4000:]}")
    seconds = {s: max(0.2, marks.get((s, "finished"), 0) - marks.get((s, "started"), 0)) for s in stages}
    shards = len(list((project / "data" / "cache" / "16").glob("shard-*.parquet")))
    meta = json.loads((project / "runs" / stages[0] / "meta.json").read_text())
    step = meta["images_seen"] // meta["steps"]
    return Setup(stages, lengths, interval, shards, seconds, step), stage_results(project, stages), cache_rows(project)


def run_trial(trial: int, base: Path, work: Path, setup: Setup, reference: dict, ref_cache: dict, rng: random.Random) -> tuple[list[Kill], list[str]]:
    project = work / f"trial-{trial}"
    shutil.copytree(base, project, symlinks=True)
    step_stage = rng.choice(setup.stages)
    save_stage = rng.choice(setup.stages[setup.stages.index(step_stage) :])
    plan = [("cache", None), ("step", step_stage), ("save", save_stage)]
    kills: list[Kill] = []
    for n, (phase, stage) in enumerate(plan):
        repro = Repro(project, work / f"trial-{trial}-run{n}.log")
        kill = kill_once(trial, phase, repro, project, setup, rng, stage)
        log = repro.log()
        for earlier in kills:  # the run that just ended holds the resume of earlier training kills
            settle_training_kill(earlier, log, setup)
        kills.append(kill)
    final = Repro(project, work / f"trial-{trial}-final.log")
    rc = final.wait(timeout=600)
    log = final.log()
    for kill in kills:
        settle_training_kill(kill, log, setup)
    problems = [] if rc == 0 else [f"the last `dvc repro` exited {rc}: {log[-2000:]}"]
    if rc == 0:
        status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=project, env=dvc_env(), capture_output=True, text=True)
        if "up to date" not in status.stdout:
            problems.append(f"`dvc status` after the run: {status.stdout.strip()[:500]}")
        problems += same_result(project, reference, ref_cache)
    end_corrupt = corrupted_files(project)
    problems += [f"at the end: {c}" for c in end_corrupt]
    for kill in kills:
        lost_ok = kill.target_stage is None or not kill.killed or (kill.lost is not None and kill.lost <= setup.interval)
        kill.recovered = not problems and not kill.corrupted and lost_ok
    return kills, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=2, help="fresh project copies; each gets one kill per phase (cache, step, save)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--workdir", type=Path, help="where the projects go (default: a temporary folder, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the projects and logs")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    t0 = time.monotonic()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fault_kill-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        base = prepare(work / "base")
        print(f"curated the tiny project in {time.monotonic() - t0:.0f} s", flush=True)
        ref_project = work / "reference"
        shutil.copytree(base, ref_project, symlinks=True)
        setup, reference, ref_cache = reference_run(ref_project, work)
        print(
            f"reference run: {setup.shards} cache shards, {len(ref_cache)} rows; stages "
            + ", ".join(f"{s} {setup.lengths[s]} images in {setup.train_seconds[s]:.1f} s" for s in setup.stages)
            + f"; a backup every {setup.interval} images ({time.monotonic() - t0:.0f} s)",
            flush=True,
        )
        kills: list[Kill] = []
        failures: list[str] = []
        for trial in range(args.trials):
            trial_kills, problems = run_trial(trial, base, work, setup, reference, ref_cache, rng)
            kills += trial_kills
            failures += [f"trial {trial}: {p}" for p in problems]
            for k in trial_kills:
                low = max(0, k.bar - k.resumed_from) if k.bar is not None and k.resumed_from is not None else "?"
                where = f"{k.landed_in}" + (f" ({k.target_stage} bar at {k.bar}), newest backup {k.newest_backup}, resumed from {k.resumed_from}, lost {low}..{k.lost}" if k.target_stage else "")
                print(
                    f"trial {trial} {k.phase:5s} {'killed' if k.killed else 'missed (run ended first)'} in {where}"
                    f"{', inside a write' if k.inside_write else ''}; corrupted {len(k.corrupted)}; {'recovered' if k.recovered else 'NOT RECOVERED'}",
                    flush=True,
                )
            for p in problems:
                print(f"trial {trial}: {p}", flush=True)
        temps = sum(len(temp_files(work / f"trial-{t}")) for t in range(args.trials))
        print_table(kills, setup, temps, time.monotonic() - t0)
        for kill in kills:
            for c in kill.corrupted:
                print(f"corrupted after trial {kill.trial} {kill.phase} kill: {c}")
        ok = all(k.recovered for k in kills) and not failures and not any(k.corrupted for k in kills)
        return 0 if ok else 1
    finally:
        if args.keep or args.workdir:
            print(f"projects and logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def print_table(kills: list[Kill], setup: Setup, temps: int, wall: float) -> None:
    print()
    print(f"{'phase':8s} {'kills':>5s} {'landed':>6s} {'recovered':>9s} {'corrupted':>9s} {'inside write':>12s} {'max lost (img)':>14s} {'save interval':>13s}")
    for phase in ("cache", "step", "save", "all"):
        group = [k for k in kills if phase in (k.phase, "all")]
        if not group:
            continue
        landed = [k for k in group if k.killed]
        losses = [k.lost for k in landed if k.lost is not None]
        lost = str(max(losses)) if losses else "-"
        print(
            f"{phase:8s} {len(group):5d} {len(landed):6d} {sum(k.recovered for k in group):9d} {sum(len(k.corrupted) for k in group):9d} "
            f"{sum(k.inside_write for k in landed):12d} {lost:>14s} {setup.interval:13d}"
        )
    print(f"temp files of interrupted writes left in the projects: {temps}")
    print(f"wall time: {wall:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
