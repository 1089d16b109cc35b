"""Disk and data safety: the input folders are never written, and a full disk during a save loses nothing.

(a) Every curation stage that reads the domain folders (ingest, watermark, near_dup, vlm_filter, caption)
    and the latent cache run with their dvc.yaml arguments on read-only folders (files 0444, folders
    0555); they must succeed and leave every input byte, mtime, mode and folder listing as it was.
(b) A training stage whose backup save hits a file-size limit (RLIMIT_FSIZE in the child, SIGXFSZ ignored,
    so the write fails with EFBIG as on a full disk) must stop with one clear ``error:`` line, leave the
    previous backup byte-identical and usable, leave no partial file, and the same command run again with
    room to write must resume from that backup and finish.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import runpy
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from harness.faults import make_good
from stagewise.train import checkpoint as ckpt
from test_trainer import TINY_DEFAULTS, write_cache, write_init

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------ (a) read-only inputs

# The curation commands of dvc.yaml, with the domain folders at photos/a and photos/b.
CURATION = [
    ("ingest", ["--domain", "a=photos/a", "--domain", "b=photos/b", "--out", "data/curated/manifest.parquet", "--store", "data/store/ingest"]),
    ("watermark", ["--manifest", "data/curated/manifest.parquet", "--out", "data/curated/watermark.parquet", "--store", "data/store/watermark",
                   "--clip-store", "data/store/clip", "--vlm-store", "data/store/watermark_vlm"]),
    ("near_dup", ["--manifest", "data/curated/manifest.parquet", "--upstream", "data/curated/watermark.parquet",
                  "--out", "data/curated/near_dup.parquet", "--store", "data/store/near_dup", "--clip-store", "data/store/clip"]),
    ("vlm_filter", ["--manifest", "data/curated/manifest.parquet", "--out", "data/curated/vlm_filter.parquet", "--store", "data/store/vlm_filter"]),
    ("caption", ["--manifest", "data/curated/manifest.parquet", "--filter", "data/curated/watermark.parquet", "--filter", "data/curated/vlm_filter.parquet",
                 "--filter", "data/curated/near_dup.parquet", "--out", "data/curated/dataset.parquet", "--captions-out", "data/curated/captions.parquet",
                 "--store", "data/store/caption"]),
    ("cache", ["--resolution", "16", "--dataset", "data/curated/dataset.parquet", "--out", "data/cache/16"]),
]  # fmt: skip


def tree_state(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: folders with their mode, mtime and listing; files with mode, size, mtime
    and sha256. Permission bits alone prove nothing when the tests run as root (root writes through 0444 /
    0555), so this before/after comparison is what catches a write; the read-only bits make a write fail
    loudly for everyone else, and check that no stage needs to write there."""
    state: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root):
        info = os.lstat(folder)
        state[os.path.relpath(folder, root) + "/"] = (stat.S_IMODE(info.st_mode), info.st_mtime_ns, tuple(sorted(dirs + files)))
        for name in files:
            path = Path(folder) / name
            info = path.lstat()
            state[os.path.relpath(path, root)] = (stat.S_IMODE(info.st_mode), info.st_size, info.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return state


def set_modes(root: Path, file_mode: int, dir_mode: int) -> None:
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            os.chmod(Path(folder) / name, file_mode)
        os.chmod(folder, dir_mode)


def run_entry_point(module: str, args: list[str], project: Path, monkeypatch) -> None:
    """``python -m stages.<module> ARGS`` in this process (what DVC runs, without a fresh interpreter each)."""
    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "argv", [f"stages/{module}.py", *args])
    try:
        runpy.run_module(f"stages.{module}", run_name="__main__", alter_sys=True)
    except SystemExit as exc:  # cli.run exits only on a failure
        raise AssertionError(f"stages.{module} exited {exc.code}") from None


def test_curation_and_cache_never_write_the_input_folders(tmp_path, monkeypatch):
    project = tmp_path / "project"
    photos = project / "photos"
    for i, domain in enumerate("ab"):
        make_good(photos / domain, 3, seed=i + 1, size_px=96)
    (photos / "a" / "good_0000.txt").write_text("a sidecar caption\n")  # caption reads sidecars beside the images
    (photos / "b" / "broken.jpg").write_bytes((photos / "b" / "good_0001.jpg").read_bytes()[:300])  # rejected on read
    (photos / "b" / "nested").mkdir()
    (photos / "b" / "nested" / "good_0000.jpg").write_bytes((photos / "a" / "good_0002.jpg").read_bytes())  # a duplicate
    params = {"codec": {"name": "pixels"}, "cache": {"resolutions": [16], "workers": 1}, "watermark": {"workers": 1}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    set_modes(photos, 0o444, 0o555)
    try:
        before = tree_state(photos)
        for module, args in CURATION:
            run_entry_point(module, args, project, monkeypatch)
        after = tree_state(photos)
    finally:
        set_modes(photos, 0o644, 0o755)  # so tmp_path can be cleaned up by a non-root user
    assert after == before
    import pandas as pd

    manifest = pd.read_parquet(project / "data/curated/manifest.parquet")
    assert len(manifest) == 8 and (manifest["status"] == "rejected").sum() == 2  # the broken file and the exact copy
    assert len(pd.read_parquet(project / "data/curated/dataset.parquet")) >= 5
    assert list((project / "data/cache/16").glob("*.parquet"))


# ------------------------------------------------------------------------------- (b) a full disk

CAP_BYTES = 200_000  # a start backup (no Adam moments yet) or model.safetensors fits; a full backup (~320 KB) does not
STAGE = {"parent": "init", "resolution_px": 16, "length_kimg": 0.04, "save_every_kimg": 0.04}  # 5 steps of 8 images
TRAIN = [sys.executable, "-m", "stages.train", "--stage", "a", "--parent", "runs/init", "--cache", "cache/16", "--out", "runs/a", "--no-progress"]


def capped(limit: int):
    def preexec() -> None:  # in the child: a write past `limit` bytes fails with EFBIG instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return preexec


def train(project: Path, length_kimg: float, limit: int | None = None) -> subprocess.CompletedProcess:
    params = {"codec": {"name": "pixels"}, "train": {"defaults": TINY_DEFAULTS, "stages": {"a": {**STAGE, "length_kimg": length_kimg}}}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(TRAIN, cwd=project, env=env, capture_output=True, text=True, preexec_fn=capped(limit) if limit else None)


def files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_a_full_disk_during_a_backup_keeps_the_previous_one_and_resumes(tmp_path):
    write_cache(tmp_path / "cache", 16)
    write_init(tmp_path / "runs" / "init")
    first = train(tmp_path, 0.04)  # start + end backup at 40 images, then finished
    assert first.returncode == 0, first.stderr
    (folder,) = (tmp_path / "runs" / "a" / "backups").iterdir()
    before = files(folder)
    assert set(before) == {"start-000000000000.json", "start-000000000000.safetensors", "end-000000000040.json", "end-000000000040.safetensors"}
    assert (folder / "end-000000000040.safetensors").stat().st_size > CAP_BYTES > (folder / "start-000000000000.safetensors").stat().st_size

    # Train more (length is not part of the fingerprint: it resumes from end-40); the next backup cannot be written.
    full = train(tmp_path, 0.08, limit=CAP_BYTES)
    assert full.returncode == 2, full.stderr
    assert "Traceback" not in full.stderr, full.stderr
    message = full.stderr.strip().splitlines()[-1]
    assert message.startswith("error: stage a: could not write ") and "File too large" in message, message
    assert f"the newest is {folder.relative_to(tmp_path)}/end-000000000040.safetensors (0.04 kimg)" in message, message
    assert "run the same command again" in message
    assert files(folder) == before  # the previous backups byte-identical, and nothing else: no temp or partial file
    tensors, meta = ckpt.Backup("end", 40, folder / "end-000000000040.json").load("cpu")
    assert not ckpt.nonfinite(tensors) and any(k.startswith("opt.") for k in tensors)
    assert (meta["kind"], meta["images_seen"], meta["fingerprint"]) == ("end", 40, folder.name)
    assert json.loads((tmp_path / "runs" / "a" / "meta.json").read_text())["images_seen"] == 40  # the published model: untouched

    again = train(tmp_path, 0.08)  # room to write again: the same command
    assert again.returncode == 0, again.stderr
    events = [json.loads(line) for line in (tmp_path / "runs" / "a" / "events.jsonl").read_text().splitlines()]
    resumed = [e for e in events if e["event"] == "resumed"]
    assert resumed[-1]["from_kimg"] == 0.04 and resumed[-1]["backup"].endswith("end-000000000040.safetensors")
    assert events[-1]["event"] == "finished"
    meta = json.loads((tmp_path / "runs" / "a" / "meta.json").read_text())
    assert meta["images_seen"] == 80 and not ckpt.nonfinite(load_file(str(tmp_path / "runs" / "a" / "model.safetensors")))


def test_a_failed_json_write_leaves_no_orphan_tensors(tmp_path, monkeypatch):
    """The tensors were written but the JSON beside them was not (the disk filled in between): the tensors
    file is removed (it could never be resumed from), the error is a SaveError, older backups stay."""
    backups = ckpt.Backups(tmp_path, "fp", keep=2)
    import torch

    backups.save("start", 0, {"w": torch.ones(3)}, {"step": 0})

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "write_json", full)
    with pytest.raises(ckpt.SaveError, match="rolling-000000000008.json: .*No space left"):
        backups.save("rolling", 8, {"w": torch.full((3,), 2.0)}, {"step": 1})
    assert sorted(p.name for p in (tmp_path / "fp").iterdir()) == ["start-000000000000.json", "start-000000000000.safetensors"]
    assert [b.images_seen for b in backups.list()] == [0]


def test_a_full_disk_anywhere_is_a_clear_error_not_a_traceback(tmp_path, monkeypatch, capsys):
    """Any write a stage makes (a final model, metrics.json, a Parquet output), not only a backup: a full disk
    or a size limit exits 2 with what to do; safetensors' own error type keeps the errno; other OS errors
    stay bugs with their traceback."""
    import argparse

    import torch
    from safetensors import SafetensorError

    from stagewise import cli

    params = tmp_path / "params.yaml"
    params.write_text("{}\n")

    def fails_with(exc: Exception):
        def main(_args):
            raise exc
        return main

    for exc in (OSError(errno.ENOSPC, "No space left on device"), ckpt.SaveError(errno.EFBIG, "could not write m.safetensors: File too large")):
        with pytest.raises(SystemExit) as exit_:
            cli.run(fails_with(exc), argparse.ArgumentParser(), ["--params", str(params)])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {exc.strerror}.") and "run the same command again" in err and "[Errno" not in err
    with pytest.raises(PermissionError):
        cli.run(fails_with(PermissionError(errno.EACCES, "Permission denied")), argparse.ArgumentParser(), ["--params", str(params)])

    def too_large(*_a, **_k):
        raise SafetensorError("Error while serializing: IoError(Os { code: 27, kind: FileTooLarge, message: \"File too large\" }) (os error 27)")

    monkeypatch.setattr(ckpt, "save_file", too_large)
    with pytest.raises(ckpt.SaveError) as saved:
        ckpt.save_tensors(Path("/tmp/never-written.safetensors"), {"w": torch.ones(2)})
    assert saved.value.errno == errno.EFBIG and str(saved.value).startswith("could not write /tmp/never-written.safetensors: ")
