"""memo_map's contract, on real PNG files and a real ResultStore: only keys missing from the store are
computed (once per content hash), unreadable images are reasons and never memos, finished work is on disk
while the map runs (a SIGKILL keeps it), images exist only for the batches in flight, and a lazily-built
model is built once, by whichever thread needs it, and not at all when nothing needs it."""

import hashlib
import os
import subprocess
import sys
import threading
import time
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from stagewise.images import load_verified
from stagewise.io import read_parquet_dir
from stagewise.store import Lazy, ResultStore, memo_map


class Row(NamedTuple):
    path: str
    sha256: str


def photos(folder, n, start=0):
    """``n`` distinct small PNGs and their manifest rows."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(start, start + n):
        path = folder / f"img_{i:02d}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(path)
        rows.append(Row(str(path), hashlib.sha256(path.read_bytes()).hexdigest()))
    return rows


def mean_red(row):
    """A per-image result computed in the decoding threads (what the hash and detector steps do)."""
    return {"red": float(np.asarray(load_verified(row.path, row.sha256, 2**20))[..., 0].mean())}


def test_only_missing_keys_are_computed_once_each(tmp_path):
    rows = photos(tmp_path / "in", 6)
    loaded, batches = [], []

    def load(row):
        loaded.append(row.path)
        return mean_red(row)

    def run_batch(batch, values):
        batches.append(len(batch))
        return values

    copy = rows[0]._replace(path=str(tmp_path / "elsewhere.png"))  # the same content at a second path
    first = memo_map([*rows, copy], ResultStore(tmp_path / "store", "fp"), load, run_batch, batch_size=4, workers=2)
    assert first.computed == 6 and not first.errors and sorted(loaded) == sorted(r.path for r in rows)
    assert batches == [4, 2]
    assert first.values[rows[2].sha256]["red"] == mean_red(rows[2])["red"]

    loaded.clear()
    more = rows + photos(tmp_path / "in", 2, start=6)
    second = memo_map(more, ResultStore(tmp_path / "store", "fp"), load, batch_size=4)
    assert second.computed == 2 and sorted(loaded) == sorted(r.path for r in more[6:])
    assert {sha: v["red"] for sha, v in second.values.items()} == {r.sha256: mean_red(r)["red"] for r in more}
    assert memo_map(more, ResultStore(tmp_path / "store", "fp"), load).computed == 0
    assert memo_map(rows[:2], ResultStore(tmp_path / "store", "other settings"), load).computed == 2  # another fingerprint

    # reuse: a memo counts only when the caller accepts it (the caption template's file-stem context).
    stale = memo_map(more, ResultStore(tmp_path / "store", "fp"), load, reuse=lambda row, stored: not row.path.endswith("img_03.png"))
    assert stale.computed == 1


def test_unreadable_images_are_reasons_not_memos(tmp_path):
    rows = photos(tmp_path / "in", 4)
    original = open(rows[1].path, "rb").read()
    open(rows[1].path, "wb").write(original[:30])  # edited after ingest
    (tmp_path / "in" / "img_02.png").unlink()
    result = memo_map(rows, ResultStore(tmp_path / "store", "fp"), mean_red, batch_size=2)
    assert result.computed == 2 and set(result.values) == {rows[0].sha256, rows[3].sha256}
    assert result.errors == {
        rows[1].sha256: "changed since ingest: content differs from the manifest's sha256 (rerun ingest)",
        rows[2].sha256: "unreadable: broken symlink or vanished file",
    }
    assert set(read_parquet_dir(tmp_path / "store")["sha256"]) == {rows[0].sha256, rows[3].sha256}
    open(rows[1].path, "wb").write(original)  # fixed: tried again, because the error was not memoised
    again = memo_map(rows, ResultStore(tmp_path / "store", "fp"), mean_red)
    assert again.computed == 1 and set(again.errors) == {rows[2].sha256}


def test_run_batch_must_return_one_result_per_image(tmp_path):
    rows = photos(tmp_path / "in", 3)
    with pytest.raises(RuntimeError, match="t: 1 results for a batch of 3 images"):
        memo_map(rows, ResultStore(tmp_path / "store", "fp"), mean_red, lambda batch, values: values[:1], desc="t")


KILLED_CHILD = """
import os, signal, sys
import numpy as np
from stagewise.images import load_verified
from stagewise.io import read_parquet_dir
from stagewise.store import ResultStore, memo_map
rows = [tuple(line.split("\\t")) for line in open(sys.argv[1]).read().splitlines()]
calls = []

def run_batch(batch, images):
    calls.append(len(batch))
    if len(calls) == 4:  # the first 4 rows were flushed after batch 2, batch 3's are pending: die, no cleanup
        print(len(read_parquet_dir(sys.argv[2])), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return [{"red": float(np.asarray(im)[..., 0].mean())} for im in images]

class Row:
    def __init__(self, path, sha256):
        self.path, self.sha256 = path, sha256

memo_map([Row(*r) for r in rows], ResultStore(sys.argv[2], "fp", flush_every=4), lambda row: load_verified(row.path, row.sha256, 2**20),
         run_batch, batch_size=2, workers=2)
"""


def test_finished_work_survives_a_sigkill(tmp_path):
    rows = photos(tmp_path / "in", 10)
    listing = tmp_path / "rows.tsv"
    listing.write_text("".join(f"{r.path}\t{r.sha256}\n" for r in rows))
    proc = subprocess.run([sys.executable, "-c", KILLED_CHILD, str(listing), str(tmp_path / "store")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == -9, proc.stderr
    assert proc.stdout.strip() == "4"  # on disk while it ran: the rows of its first flush (4 rows)
    resumed = memo_map(rows, ResultStore(tmp_path / "store", "fp"), mean_red)
    assert resumed.computed == 6 and len(resumed.values) == 10


def test_images_exist_only_for_the_batches_in_flight(tmp_path):
    rows = photos(tmp_path / "in", 24)
    alive, most, lock = [0], [0], threading.Lock()

    def load(row):
        with lock:
            alive[0] += 1
            most[0] = max(most[0], alive[0])
        return np.asarray(load_verified(row.path, row.sha256, 2**20))

    def run_batch(batch, images):
        time.sleep(0.01)  # a slow model: the decoding threads would race ahead if nothing held them back
        with lock:
            alive[0] -= len(images)
        return [{"red": float(im[..., 0].mean())} for im in images]

    result = memo_map(rows, ResultStore(tmp_path / "store", "fp"), load, run_batch, batch_size=2, workers=4)
    assert result.computed == 24 and most[0] <= 3 * 2  # this batch and the two loading ahead of it


def test_a_lazy_model_is_built_once_and_only_when_needed(tmp_path):
    rows = photos(tmp_path / "in", 8)
    builds = []

    def build():
        builds.append(threading.current_thread().name)
        time.sleep(0.05)  # long enough for every decoding thread to ask for it meanwhile
        return lambda arr: float(arr[..., 1].mean())

    def loader(model):
        def load(row):  # the model's preprocessing runs in the decoding threads, as a VLM's does
            image = np.asarray(load_verified(row.path, row.sha256, 2**20))
            return model.get()(image)
        return load

    result = memo_map(rows, ResultStore(tmp_path / "store", "fp"), loader(Lazy(build)), lambda batch, greens: [{"green": g} for g in greens],
                      batch_size=4, workers=4)
    assert result.computed == 8 and len(builds) == 1

    idle = Lazy(build)
    for row in rows[:2]:
        os.unlink(row.path)
    gone = memo_map(rows[:2], ResultStore(tmp_path / "store", "another model"), loader(idle))
    assert set(gone.errors) == {r.sha256 for r in rows[:2]} and idle.value is None  # nothing readable: never built
