"""Resume after a kill, with real processes: `python -m stages.train` killed mid-stage, and `dvc repro`
killed mid-stage; plus the DAG's contract that editing one stage reruns only it, its descendants and report."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT, dvc, make_project, run, set_params
from stagewise.io import write_parquet
from test_trainer import TINY_DEFAULTS, TINY_MODEL, write_cache, write_init

# 8 images per step, a rolling backup every 10 steps, 60 steps in all.
RESUME_STAGE = {"parent": "init", "resolution_px": 16, "length_kimg": 0.48, "save_every_kimg": 0.08, "lr_dropout": 0.5, "ema": {"halflife_kimg": 0.05}}


def train_cmd(out: str) -> list[str]:
    return [sys.executable, "-m", "stages.train", "--stage", "a", "--parent", "runs/init", "--cache", "cache/16", "--out", out, "--no-progress"]


def env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def wait_for(predicate, timeout_s: float, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before the condition held:\n{proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.02)
    raise AssertionError("timed out")


def rolling_backups(backups: Path, after_images: int = 0) -> list[int]:
    """images_seen of the rolling backups under ``backups`` (those beyond ``after_images``)."""
    return sorted(n for p in backups.glob("*/rolling-*.json") if (n := int(p.stem.split("-")[1])) > after_images)


def kill_after_a_backup(cmd: list[str], cwd: Path, backups: Path, extra_env: dict[str, str] | None = None) -> int:
    """Start the training command, SIGKILL it once it has written a rolling backup under ``backups``, and
    return the images_seen of the newest backup at the kill."""
    proc = subprocess.Popen(cmd, cwd=cwd, env={**env(), **(extra_env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: rolling_backups(backups), 120, proc)
        newest_at_kill = rolling_backups(backups)[-1]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return newest_at_kill


def test_killed_training_process_resumes_to_the_uninterrupted_result(tmp_path):
    write_cache(tmp_path / "cache", 16)
    write_init(tmp_path / "runs" / "init")
    params = {"codec": {"name": "pixels"}, "train": {"defaults": TINY_DEFAULTS, "stages": {"a": RESUME_STAGE}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    run(train_cmd("reference/a"), tmp_path)  # uninterrupted

    newest_at_kill = kill_after_a_backup(train_cmd("runs/a"), tmp_path, tmp_path / "runs" / "a" / "backups")
    assert newest_at_kill < 480 and not (tmp_path / "runs" / "a" / "model.safetensors").exists()  # killed mid-stage

    run(train_cmd("runs/a"), tmp_path)  # the same command again

    meta, reference = (json.loads((tmp_path / d / "a" / "meta.json").read_text()) for d in ("runs", "reference"))
    assert meta["images_seen"] == reference["images_seen"] == 480
    events = [json.loads(line) for line in (tmp_path / "runs" / "a" / "events.jsonl").read_text().splitlines()]
    resumed = [e for e in events if e["event"] == "resumed"]
    # It continued from the newest backup there was when killed (or one written in the instant before the
    # kill landed): at most one save interval (80 images) of progress lost.
    assert len(resumed) == 1 and resumed[0]["from_kimg"] * 1000 >= newest_at_kill
    # Bit-identical to the uninterrupted run: model, EMA, Adam moments, data order, LRD masks, all of it.
    ours, theirs = load_file(str(tmp_path / "runs/a/model.safetensors")), load_file(str(tmp_path / "reference/a/model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (tmp_path / "runs/a/history.tsv").read_text().splitlines()[-1].split("\t")[:3] == (tmp_path / "reference/a/history.tsv").read_text().splitlines()[-1].split("\t")[:3]


# --------------------------------------------------------------------------------------- the DAG


def tiny_recipe() -> dict:
    """The default recipe's stages (names, parents, mechanisms) at 8 -> 32 px on the pixels codec, a few steps each."""
    recipe = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["stages"]
    size = {128: 8, 256: 16, 512: 32}
    return {name: {**spec, "resolution_px": size[spec["resolution_px"]], "length_kimg": 0.032, **({"fade_in_kimg": 0.016} if "fade_in_kimg" in spec else {})} for name, spec in recipe.items()}


def ran(proc: subprocess.CompletedProcess) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", proc.stdout + proc.stderr)


def training_project(dest: Path) -> Path:
    """A DVC project with this repository's real init / train / report blocks, on tiny pixel caches that a
    test writes itself (the curation stages have their own end-to-end test; here they would only cost time)."""
    project = make_project(dest, {"codec": {"name": "pixels"}, "model": {**TINY_MODEL, "resolution_px": 8}})
    dag = yaml.safe_load((project / "dvc.yaml").read_text())
    dag["stages"] = {k: v for k, v in dag["stages"].items() if k in ("init", "train", "report")}
    (project / "dvc.yaml").write_text(yaml.safe_dump(dag, sort_keys=False))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"].update(defaults={**TINY_DEFAULTS, "save_every_kimg": 0.016}, stages=tiny_recipe())  # replaced, not merged
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for res in (8, 16, 32):
        write_cache(project / "data" / "cache", res)
    manifest = pd.DataFrame({"path": ["a/1.jpg", "a/2.jpg", "b/1.txt"], "domain": ["a", "a", "b"], "sha256": ["1", "2", "3"], "status": ["kept", "kept", "rejected"], "reason": ["", "", "not an image: format not recognised"]})
    write_parquet(project / "data/curated/manifest.parquet", manifest)
    return project


def test_dvc_reruns_only_the_edited_stage_and_its_descendants_and_resumes_after_a_kill(tmp_path):
    project = training_project(tmp_path / "project")
    first = dvc(project, "repro")
    stages = [f"train@{name}" for name in tiny_recipe()]
    assert [s for s in ran(first) if s.startswith(("init", "train@", "report"))] == ["init", *stages, "report"]
    summary = (project / "reports/summary.md").read_text()
    assert all(f"| {name} |" in summary for name in tiny_recipe()) and "not an image: 1" in summary
    for name in tiny_recipe():
        assert {"model.safetensors", "meta.json", "metrics.json", "history.tsv", "preview.png", "events.jsonl"} <= {p.name for p in (project / "runs" / name).iterdir()}

    set_params(project / "params.yaml", {"train": {"stages": {"lrd": {"length_kimg": 0.048}}}})
    assert sorted(ran(dvc(project, "repro"))) == ["report", "train@gan", "train@lrd"]

    # Lengthen gan (DFL's "train more": it continues from its end backup, the length is not part of the
    # resume fingerprint), kill `dvc repro` and the stage it runs once a new rolling backup exists, run it again.
    set_params(project / "params.yaml", {"train": {"stages": {"gan": {"length_kimg": 0.16}}}})
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=project, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: rolling_backups(project / "runs/gan/backups", after_images=32), 180, proc)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not (project / "runs/gan/model.safetensors").exists()
    again = dvc(project, "repro")
    assert ran(again) == ["train@gan", "report"]
    assert json.loads((project / "runs/gan/meta.json").read_text())["images_seen"] == 160  # as if never killed
    events = [json.loads(line)["event"] for line in (project / "runs/gan/events.jsonl").read_text().splitlines()]
    assert events.count("resumed") == 2 and events[-1] == "finished"  # from the old end, then after the kill
    assert "Data and pipelines are up to date." in dvc(project, "status").stdout
    report = json.loads((project / "reports/metrics.json").read_text())
    assert report["stages"]["gan"]["kimg"] == 0.16 and report["curation"]["manifest"]["rejected"] == 1
