"""NaN injection: a real `python -m stages.train` process per trial, in each precision (fp32, bf16, fp16).

Each trial trains a tiny stage (pixels codec, 16 px, 20 steps of 8 images, a backup every 5 steps, a
status check every 2) with ``STAGEWISE_POISON_STEPS`` set: one or two runs of 3-5 consecutive steps, at
random steps, have their batch turned into NaN (``stagewise.train.guard``). The guard's
``max_bad_steps`` is 3, so every run must trigger exactly one rollback to the last good backup, with the
LR halved each time, and the stage must then finish. Checked per trial:

- the process exits 0 with no traceback;
- ``events.jsonl`` tells the story, in order: ``started``, one ``rollback`` per injected run (its reason
  names the non-finite steps and the step where they were noticed, which lies inside that run; it goes
  back to a backup at or before that point; the count and the LR go 1, 2 and x0.5, x0.25), ``finished``;
- ``model.safetensors`` and every backup hold only finite values;
- ``images_seen`` (meta.json and metrics.json) equals the stage length, and ``rollbacks`` the runs injected.

A separate row per precision poisons every step from a random one on: the NaN persists past
``max_rollbacks`` (2). The stage must stop with exit 2 and one ``error:`` line that says it gave up after
2 rollbacks and names the last good backup (which must exist and be finite); ``events.jsonl`` must end
with ``failed`` naming the same backup, and nothing non-finite may be saved (no model.safetensors at all).

    .venv/bin/python benchmarks/fault_nan.py                 # 2 trials per precision + the persistent rows
    .venv/bin/python benchmarks/fault_nan.py --trials 5 --seed 3 --jobs 1

Prints one line per trial and a table: precision, trials, recovered, rollbacks used (total / max per
trial), finite saved models, wall time. Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from stagewise.train import checkpoint as ckpt  # noqa: E402
from stagewise.train.guard import POISON_ENV  # noqa: E402

PRECISIONS = ("fp32", "bf16", "fp16")
BATCH = 4  # per domain: 8 images a step
STEPS = 20
LENGTH_IMAGES = STEPS * 2 * BATCH  # 160
MAX_BAD_STEPS = 3  # a run of 3 skipped steps triggers a rollback
RUN_LENGTHS = (3, 4, 5)  # >= MAX_BAD_STEPS, < 2 * MAX_BAD_STEPS: what a rollback leaves of a run cannot trigger another
LR = 0.002
STAGE = dict(
    parent="init", resolution_px=16, length_kimg=LENGTH_IMAGES / 1000, batch_size=BATCH, lr=LR,
    log_every_kimg=0.016, save_every_kimg=0.04, holdout_per_domain=1, preview_rows=1,
    guard=dict(max_bad_steps=MAX_BAD_STEPS, max_rollbacks=3, lr_factor=0.5, eps_factor=10.0),
)
PERSIST_ROLLBACKS = 2


def stage_settings(precision: str, persistent: bool = False) -> dict:
    spec = {**STAGE, "precision": precision, "guard": dict(STAGE["guard"])}
    if precision == "fp16":
        spec["eps"] = 1e-5  # the recipe's advice for fp16 (1e-7 underflows)
    if persistent:
        spec["guard"]["max_rollbacks"] = PERSIST_ROLLBACKS
    return spec


def prepare(work: Path) -> None:
    """A latent cache at 16 px (pixels codec), an init model and a params.yaml with one stage per case."""
    from test_trainer import TINY_MODEL, write_cache, write_init

    write_cache(work / "cache", 16)
    write_init(work / "runs" / "init", **{**TINY_MODEL, "resolution_px": 16})
    stages = {p: stage_settings(p) for p in PRECISIONS}
    stages.update({f"{p}_persist": stage_settings(p, persistent=True) for p in PRECISIONS})
    (work / "params.yaml").write_text(yaml.safe_dump({"codec": {"name": "pixels"}, "train": {"stages": stages}}, sort_keys=False))


def plan_runs(rng: random.Random) -> list[tuple[int, int]]:
    """One or two non-adjacent runs of poisoned steps, (first step, last step), in step order."""
    count = rng.choice((1, 2))
    while True:
        runs = []
        for _ in range(count):
            length = rng.choice(RUN_LENGTHS)
            start = rng.randrange(1, STEPS - length + 1)
            runs.append((start, start + length - 1))
        runs.sort()
        if all(b[0] > a[1] + 1 for a, b in zip(runs, runs[1:])):  # at least one clean step between runs
            return runs


@dataclass
class Trial:
    precision: str
    index: int
    persistent: bool
    poison: list[int]
    runs: list[tuple[int, int]] = field(default_factory=list)
    ok: bool = False
    rollbacks: int = 0
    finite_model: bool = False
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


def all_backups_finite(out: Path) -> list[str]:
    return [str(p) for p in sorted((out / "backups").rglob("*.safetensors")) if ckpt.nonfinite(load_file(str(p)))]


def read_events(out: Path) -> list[dict]:
    path = out / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_trial(work: Path, trial: Trial) -> Trial:
    stage = f"{trial.precision}_persist" if trial.persistent else trial.precision
    out = f"runs/{stage}_t{trial.index}"
    cmd = [sys.executable, "-m", "stages.train", "--stage", stage, "--parent", "runs/init", "--cache", "cache/16", "--out", out, "--no-progress"]
    env = {**os.environ, POISON_ENV: ",".join(map(str, trial.poison)), "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    trial.seconds = time.perf_counter() - started
    out_dir = work / out
    problems = trial.problems
    events = read_events(out_dir)
    kinds = [e["event"] for e in events]
    rollbacks = [e for e in events if e["event"] == "rollback"]
    trial.rollbacks = len(rollbacks)
    if "Traceback (most recent call last)" in proc.stderr:
        problems.append("traceback:\n" + proc.stderr[-3000:])
    bad_backups = all_backups_finite(out_dir)
    if bad_backups:
        problems.append(f"non-finite backups: {bad_backups}")
    for i, event in enumerate(rollbacks, 1):
        at = re.search(r"non-finite steps at [\d.]+ kimg \(step (\d+)\)", event["reason"])
        if not at:
            problems.append(f"rollback {i}: reason does not name the non-finite steps: {event['reason']!r}")
            continue
        noticed = int(at[1])  # st.step when the guard noticed: steps 0 .. noticed-1 have run
        if event["rollbacks"] != i or abs(event["lr"] - LR * 0.5**i) > 1e-12:
            problems.append(f"rollback {i}: count {event['rollbacks']}, lr {event['lr']} (want {i}, {LR * 0.5**i})")
        if not event["to_kimg"] * 1000 <= noticed * 2 * BATCH:
            problems.append(f"rollback {i}: went forward to {event['to_kimg']} kimg from step {noticed}")
        if not Path(work / event["backup"]).exists():
            problems.append(f"rollback {i}: backup {event['backup']} does not exist")
        if not trial.persistent and i <= len(trial.runs):
            first, last = trial.runs[i - 1]
            if not first + MAX_BAD_STEPS <= noticed <= last + 3:  # noticed at a status check (every 2 steps)
                problems.append(f"rollback {i}: noticed at step {noticed}, the run was steps {first}..{last}")

    if not trial.persistent:
        want = ["started"] + ["rollback"] * len(trial.runs) + ["finished"]
        if proc.returncode != 0:
            problems.append(f"exit {proc.returncode}:\n{proc.stderr[-2000:]}")
        if kinds != want:
            problems.append(f"events {kinds}, want {want}")
        model = out_dir / ckpt.MODEL_FILE
        trial.finite_model = model.exists() and not ckpt.nonfinite(load_file(str(model)))
        if not trial.finite_model:
            problems.append("model.safetensors missing or not finite")
        meta_path, metrics_path = out_dir / ckpt.META_FILE, out_dir / "metrics.json"
        if meta_path.exists() and metrics_path.exists():
            meta, metrics = json.loads(meta_path.read_text()), json.loads(metrics_path.read_text())
            if not meta["images_seen"] == metrics["images_seen"] == LENGTH_IMAGES:
                problems.append(f"images_seen {meta['images_seen']} / {metrics['images_seen']}, want {LENGTH_IMAGES}")
            if meta["rollbacks"] != len(trial.runs):
                problems.append(f"meta.json rollbacks {meta['rollbacks']}, want {len(trial.runs)}")
        else:
            problems.append("meta.json / metrics.json missing")
    else:
        lines = proc.stderr.strip().splitlines()
        message = lines[-1] if lines else ""
        if proc.returncode != 2:
            problems.append(f"exit {proc.returncode}, want 2:\n{proc.stderr[-2000:]}")
        if not (message.startswith(f"error: stage {stage}: ") and f"after {PERSIST_ROLLBACKS} rollback(s)" in message and "giving up" in message):
            problems.append(f"message: {message!r}")
        named = re.search(r"the last good backup is (\S+\.safetensors)", message)
        if not named:
            problems.append(f"the message names no good backup: {message!r}")
        elif not (work / named[1]).exists() or ckpt.nonfinite(load_file(str(work / named[1]))):
            problems.append(f"the named backup {named[1]} is missing or not finite")
        want = ["started"] + ["rollback"] * PERSIST_ROLLBACKS + ["failed"]
        if kinds != want:
            problems.append(f"events {kinds}, want {want}")
        elif named and events[-1].get("good_backup") != named[1]:
            problems.append(f"failed event names {events[-1].get('good_backup')}, the message {named[1]}")
        trial.finite_model = not (out_dir / ckpt.MODEL_FILE).exists()  # nothing published: nothing non-finite
        if not trial.finite_model:
            problems.append("a model.safetensors was written by a stage that failed")
    trial.ok = not problems
    return trial


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=2, help="trials per precision (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the poisoned steps (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=2, help="training processes at a time (default: %(default)s)")
    parser.add_argument("--no-persistent", action="store_true", help="skip the persistent-NaN rows")
    parser.add_argument("--workdir", type=Path, help="work folder (default: a temporary folder, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder and print its path")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fault_nan-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        prepare(work)
        trials: list[Trial] = []
        for precision in PRECISIONS:
            for index in range(args.trials):
                runs = plan_runs(rng)
                trials.append(Trial(precision, index, False, [s for a, b in runs for s in range(a, b + 1)], runs))
        if not args.no_persistent:
            for precision in PRECISIONS:
                first = rng.randrange(2, 9)
                trials.append(Trial(precision, 0, True, list(range(first, first + 400))))
        print(f"{len(trials)} training processes, {args.jobs} at a time; stage: {STEPS} steps of {2 * BATCH} images, "
              f"a backup every 5 steps, rollback after {MAX_BAD_STEPS} non-finite steps", flush=True)

        def one(trial: Trial) -> Trial:
            run_trial(work, trial)
            what = f"poison steps {trial.poison[0]}.." if trial.persistent else "poison " + ", ".join(f"{a}-{b}" for a, b in trial.runs)
            print(f"  {trial.precision}{' persistent' if trial.persistent else ''} #{trial.index}: {what}: "
                  f"{'ok' if trial.ok else 'FAILED'}, {trial.rollbacks} rollback(s), {trial.seconds:.1f} s", flush=True)
            for p in trial.problems:
                print(f"      {p}", flush=True)
            return trial

        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            done = list(pool.map(one, trials))
        wall = time.perf_counter() - t0

        print()
        header = f"{'precision':<20} {'trials':>6} {'recovered':>11} {'rollbacks (total / max)':>24} {'finite saved models':>20} {'wall s':>7}"
        print(header)
        print("-" * len(header))
        for persistent in (False, True):
            for precision in PRECISIONS:
                rows = [t for t in done if t.precision == precision and t.persistent == persistent]
                if not rows:
                    continue
                label = f"{precision} persistent" if persistent else precision
                recovered = sum(t.ok for t in rows) if not persistent else 0
                stopped = f"stopped {sum(t.ok for t in rows)}/{len(rows)}" if persistent else f"{recovered}/{len(rows)}"
                rb = f"{sum(t.rollbacks for t in rows)} / {max(t.rollbacks for t in rows)}"
                finite = f"{sum(t.finite_model for t in rows)}/{len(rows)}" if not persistent else f"none saved {sum(t.finite_model for t in rows)}/{len(rows)}"
                print(f"{label:<20} {len(rows):>6} {stopped:>11} {rb:>24} {finite:>20} {sum(t.seconds for t in rows):>7.1f}")
        failed = [t for t in done if not t.ok]
        print(f"\n{len(done) - len(failed)}/{len(done)} trials passed every check; wall time {wall:.0f} s "
              f"(the per-row seconds are process times, {args.jobs} at a time)")
        if args.keep:
            print(f"work folder: {work}")
        return 1 if failed else 0
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
