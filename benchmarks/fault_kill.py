"""Kill tests: SIGKILL a real `dvc repro` of the tiny pipeline at random moments, run it again, check it.

Each trial is a fresh copy of the tiny project (tests/tiny_pipeline.py: pixels codec, 16 px, recipe
lrd -> gan) whose curation has already run. One `dvc repro` chain per trial, with one kill per phase:

  cache   `dvc repro` is killed while `cache@16` writes its Parquet shards: at the creation of the k-th
          shard temp file (k random), plus a random 0-4 ms;
  step    the next `dvc repro` is killed a random time into a training stage (lrd or gan, random): once
          the stage runs (its events.jsonl says resumed / started) and has saved the backup before a
          random image count, plus a random part of one save interval's training time;
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

Progress lost by a training kill: an upper bound (harness.kill.settle_training_kill says how it is
bounded), <= one save interval exactly when the run after the kill resumed from the newest complete backup.
Moments and progress are read from what the pipeline writes (temp-file creations, backups, events.jsonl),
never from its console output; the kill harness is tests/harness/kill.py, shared with
tests/test_fault_kill.py.

    python benchmarks/fault_kill.py [--trials 2] [--seed 0] [--workdir DIR] [--keep]

Prints one line per kill and a table: phase, kills, recovered, corrupted files, max progress lost (images)
vs the save interval, how many kills landed inside a write (a temp file left, or a backup without its
JSON), and the total wall time.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's stagewise, wherever the script is run from
sys.path.insert(0, str(ROOT / "tests"))  # the kill harness and the tiny project, shared with the tests

import yaml  # noqa: E402
from harness.kill import Kill, Repro, Setup, cache_rows, corrupted_files, dvc_env, kill_once, same_result, settle_training_kill, stage_events, stage_results, temp_files  # noqa: E402

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
    """One uninterrupted `dvc repro`, timing each training stage from the outside (when its started and
    finished events appear)."""
    stages, lengths, interval = recipe(project)
    repro = Repro(project, logs / "reference.log")
    marks: dict[tuple[str, str], float] = {}
    while repro.alive():
        for stage in stages:
            for event in stage_events(project, stage):
                if event["event"] in ("started", "finished"):
                    marks.setdefault((stage, event["event"]), time.monotonic())
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
        for earlier in kills:  # the run that just ended may have resumed the stages of earlier training kills
            settle_training_kill(earlier, project, setup)
        kills.append(kill)
    final = Repro(project, work / f"trial-{trial}-final.log")
    rc = final.wait(timeout=600)
    log = final.log()
    for kill in kills:
        settle_training_kill(kill, project, setup)
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
                where = f"{k.landed_in}" + (f" ({k.target_stage}), newest backup {k.newest_backup}, resumed from {k.resumed_from}, lost <= {k.lost}" if k.target_stage else "")
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
