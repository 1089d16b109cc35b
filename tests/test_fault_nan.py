"""NaN injection in each precision (the pytest-sized version of benchmarks/fault_nan.py, in-process).

A run of NaN batches at a (seeded) random step must roll back once to the last good backup, lower the LR
and finish with a finite model and the full stage length; a NaN that persists past ``max_rollbacks`` must
stop the stage naming the last good backup, with nothing non-finite saved. The benchmark does the same
with real `python -m stages.train` processes and more trials.
"""

from __future__ import annotations

import json
import random
import re

import pytest
from safetensors.torch import load_file

from stagewise.cli import StageError
from stagewise.train import checkpoint as ckpt
from stagewise.train.guard import POISON_ENV
from stagewise.train.loop import run_stage
from test_trainer import job, project, stage, train_cfg  # noqa: F401  (project is a fixture)

GUARD = {"max_bad_steps": 3, "max_rollbacks": 3, "lr_factor": 0.5, "eps_factor": 10}
STEPS = 15  # 8 images a step: 0.12 kimg; a backup every 5 steps, a status check every 2


def settings(precision: str, **kw) -> dict:
    return stage(kimg=0.12, precision=precision, guard={**GUARD, **kw}, **({"eps": 1e-5} if precision == "fp16" else {}))


def events(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]


def backups_finite(folder) -> bool:
    files = list((folder / "backups").rglob("*.safetensors"))
    return bool(files) and all(not ckpt.nonfinite(load_file(str(p))) for p in files)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_nan_run_at_a_random_step_rolls_back_and_finishes(project, monkeypatch, precision):  # noqa: F811
    rng = random.Random(f"nan-{precision}")
    length = rng.choice((3, 4, 5))  # >= max_bad_steps: one rollback; < 2x: what is left of it cannot trigger another
    first = rng.randrange(1, STEPS - length + 1)
    monkeypatch.setenv(POISON_ENV, ",".join(str(s) for s in range(first, first + length)))
    metrics = run_stage(job(project, "a", train_cfg({"a": settings(precision)})))
    out = project / "runs" / "a"
    log = events(out)
    assert [e["event"] for e in log] == ["started", "rollback", "finished"], (first, length, log)
    rollback = log[1]
    noticed = int(re.search(r"non-finite steps at [\d.]+ kimg \(step (\d+)\)", rollback["reason"])[1])
    assert first + 3 <= noticed <= first + length + 2  # noticed at the first status check after 3 bad steps
    assert rollback["to_kimg"] * 1000 <= noticed * 8 and rollback["lr"] == pytest.approx(0.001)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["images_seen"] == metrics["images_seen"] == 120 and meta["rollbacks"] == 1
    assert not ckpt.nonfinite(load_file(str(out / "model.safetensors")))
    assert backups_finite(out)


def test_a_persistent_nan_stops_naming_the_last_good_backup(project, monkeypatch):  # noqa: F811
    """fp16: the grad scaler also sees these NaNs (and backs off); the guard must still count them."""
    monkeypatch.setenv(POISON_ENV, ",".join(str(s) for s in range(4, 400)))
    with pytest.raises(StageError) as err:
        run_stage(job(project, "a", train_cfg({"a": settings("fp16", max_rollbacks=2)})))
    message = str(err.value)
    assert "after 2 rollback(s)" in message and "giving up" in message and "max_rollbacks = 2" in message
    named = re.search(r"the last good backup is (\S+\.safetensors)", message)[1]
    assert not ckpt.nonfinite(load_file(named))
    out = project / "runs" / "a"
    log = events(out)
    assert [e["event"] for e in log] == ["started", "rollback", "rollback", "failed"]
    assert log[-1]["good_backup"] == named
    assert backups_finite(out) and not (out / "model.safetensors").exists()
