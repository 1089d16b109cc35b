"""The user's own folders (params.yaml data.domains) under real DVC, in a temp git repo with the two
folders outside it, read-only and nested: `dvc status` sees an added, changed or deleted image, and
`dvc repro` processes only those (counted from each stage's memo store and the cache's run stats, not
from log text); an edited sidecar caption relabels one image; the latents exist once on disk. Then bad
folders fail before any work with the params key to fix."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from conftest import dvc, make_project, run, taef2_dir
from stagewise.io import read_parquet_dir
from stagewise.latents import read_index

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:dvc.*"),
    pytest.mark.skipif(taef2_dir() is None, reason="TAEF2 weights not found"),
]

RES = 64  # a multiple of 8 (taef2's factor): 8 x 8 latents, quick on a CPU
CACHE = f"cache@{RES}"
MEMO_STAGES = ("ingest", "watermark", "near_dup", "caption")  # rows in data/store/<stage> = images it computed
GIT_USER = ["-c", "user.name=stagewise tests", "-c", "user.email=tests@stagewise.invalid"]


def photo(name: str, box: tuple[int, int, int, int]) -> bytes:
    """A 96 px JPEG crop of one of scikit-image's bundled photos."""
    import io

    import skimage.data

    img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB").crop(box).resize((96, 96), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def set_read_only(root: Path, read_only: bool) -> None:
    """Folders 0555 / files 0444 while DVC and the stages run on them; writable again to edit them."""
    for folder, _dirs, files in os.walk(root):
        for name in files:
            os.chmod(os.path.join(folder, name), stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH | (0 if read_only else stat.S_IWUSR))
        os.chmod(folder, 0o555 if read_only else 0o755)


def memo_rows(project: Path) -> dict[str, int]:
    return {stage: len(read_parquet_dir(project / "data/store" / stage)) for stage in MEMO_STAGES}


def stale_stages(project: Path) -> set[str]:
    return set(json.loads(dvc(project, "status", "--json", "--with-deps", CACHE).stdout))


def repro(project: Path, photos: Path) -> dict:
    """`dvc repro cache@64` on read-only folders; what each stage computed in it."""
    before = memo_rows(project)
    set_read_only(photos, True)
    try:
        dvc(project, "repro", CACHE)
    finally:
        set_read_only(photos, False)
    after = memo_rows(project)
    return {**{s: after[s] - before[s] for s in MEMO_STAGES}, "cache": json.loads((project / f"data/cache/{RES}-run.json").read_text())}


def latents(project: Path) -> dict[tuple[str, bool], bytes]:
    rows = pd.concat([pd.read_parquet(p) for p in sorted((project / f"data/cache/{RES}").glob("shard-*.parquet"))])
    return {(r.sha256, bool(r.flipped)): r.latent for r in rows.itertuples()}


def test_added_changed_deleted_images_and_an_edited_sidecar_are_all_that_is_processed(tmp_path, monkeypatch):
    monkeypatch.setenv("STAGEWISE_MODELS", str(taef2_dir().parent))
    photos = tmp_path / "photos"  # outside the repository
    write(photos / "a/astronaut.jpg", photo("astronaut", (140, 40, 340, 240)))
    write(photos / "a/astronaut.txt", "an astronaut in a white spacesuit\n")
    write(photos / "a/cats/chelsea.jpg", photo("chelsea", (60, 20, 300, 260)))
    write(photos / "b/coffee.jpg", photo("coffee", (100, 0, 500, 400)))
    write(photos / "b/space/hubble.jpg", photo("hubble_deep_field", (0, 0, 400, 400)))
    write(photos / "b/immuno.jpg", photo("immunohistochemistry", (0, 0, 300, 300)))
    domains = {"a": str(photos / "a"), "b": str(photos / "b")}
    # align off: these photos are not faces (a cat, coffee, a galaxy field), and the test is about the folders
    project = make_project(tmp_path / "project", {"data": {"domains": domains}, "cache": {"resolutions": [RES]}, "align": {"enabled": False}}, sample=False)

    first = repro(project, photos)
    assert first["ingest"] == first["watermark"] == first["near_dup"] == 5 and first["caption"] == 4  # 1 sidecar
    assert first["cache"]["images_encoded"] == 5 and first["cache"]["rows_encoded"] == 10
    dataset = pd.read_parquet(project / "data/curated/dataset.parquet")
    assert sorted(dataset["path"]) == sorted(str(p) for p in photos.rglob("*.jpg"))  # nested folders included
    old = latents(project)

    # One image added (two folders deep), one changed in place, one deleted.
    write(photos / "a/cats/more/retina.jpg", photo("retina", (300, 300, 1100, 1100)))
    write(photos / "b/space/hubble.jpg", photo("hubble_deep_field", (400, 400, 800, 800)))
    (photos / "b/immuno.jpg").unlink()
    assert {"ingest", "caption"} <= stale_stages(project)  # the folders are the stages' dependencies
    second = repro(project, photos)
    assert {s: second[s] for s in MEMO_STAGES} == {"ingest": 2, "watermark": 2, "near_dup": 2, "caption": 2}
    assert second["cache"]["images_encoded"] == 2 and second["cache"]["rows_encoded"] == 4  # with flips
    assert second["cache"]["rows_pruned"] == 4 and second["cache"]["rows_reused"] == 6  # old hubble + immuno gone
    dataset = pd.read_parquet(project / "data/curated/dataset.parquet")
    assert sorted(dataset["path"]) == sorted(str(p) for p in photos.rglob("*.jpg"))
    new = latents(project)
    assert {sha for sha, _ in new} == set(dataset["sha256"])  # deleted and replaced images left the cache
    assert all(new[key] == old[key] for key in new.keys() & old.keys())
    assert not stale_stages(project)

    # An edited sidecar: only caption (and the cache's caption column) changes; nothing is decoded or encoded.
    write(photos / "a/astronaut.txt", "an astronaut, edited caption\n")
    assert "caption" in stale_stages(project)
    third = repro(project, photos)
    assert {s: third[s] for s in MEMO_STAGES} == {"ingest": 0, "watermark": 0, "near_dup": 0, "caption": 0}
    assert third["cache"]["rows_encoded"] == 0 and third["cache"]["rows_relabelled"] == 2
    captions = pd.read_parquet(project / "data/curated/dataset.parquet").set_index("path")["caption"]
    assert captions[str(photos / "a/astronaut.jpg")] == "an astronaut, edited caption"
    assert latents(project) == new

    # Nothing stored twice: the latent shards are in data/cache only, not copied into DVC's cache.
    in_dvc_cache = {p.parent.name + p.name for p in (project / ".dvc/cache").rglob("*") if p.is_file()}
    shards = list((project / f"data/cache/{RES}").glob("shard-*.parquet"))
    assert shards and not {hashlib.md5(p.read_bytes()).hexdigest() for p in shards} & in_dvc_cache


def test_bad_folders_fail_before_any_work_naming_the_params_key(tmp_path):
    empty, a_file = tmp_path / "empty", tmp_path / "photos/photo.jpg"
    (empty / "sub").mkdir(parents=True)
    write(empty / "sub/notes.txt", "no image here\n")
    write(a_file, photo("coffee", (0, 0, 300, 300)))
    project = make_project(tmp_path / "project", {"data": {"domains": {"a": str(tmp_path / "missing"), "b": str(empty)}}}, sample=False)

    failed = dvc(project, "repro", "ingest", check=False)
    out = failed.stdout + failed.stderr
    assert failed.returncode != 0 and "Traceback" not in out
    assert f"error: params.yaml: data.domains.a: {tmp_path / 'missing'}: folder does not exist" in out
    assert f"params.yaml: data.domains.b: {empty}: holds no image files" in out
    assert not (project / "data/curated/manifest.parquet").exists() and not (project / "data/store").exists()

    # The same check through `dvc exp run -S`, DVC's templating of data.domains included.
    run(["git", "add", "-A"], project)
    run(["git", *GIT_USER, "commit", "-q", "-m", "project"], project)
    failed = dvc(project, "exp", "run", "-S", f"data.domains.a={a_file}", "-S", f"data.domains.b={a_file.parent}", "ingest", check=False)
    out = failed.stdout + failed.stderr
    assert failed.returncode != 0 and f"error: params.yaml: data.domains.a: {a_file}: is a file, not a folder of images" in out
    assert "data.domains.b" not in out  # the folder holding photo.jpg is a valid one
    assert not (project / "data/curated/manifest.parquet").exists()


def test_a_domain_with_no_kept_image_fails_the_cache_stage_with_the_reasons_counted(tmp_path, monkeypatch, capsys):
    photos = tmp_path / "photos"
    write(photos / "a/astronaut.jpg", photo("astronaut", (140, 40, 340, 240)))
    write(photos / "b/tiny.jpg", photo("coffee", (0, 0, 300, 300)))
    Image.open(photos / "b/tiny.jpg").resize((32, 32)).save(photos / "b/tiny.jpg")  # < min_side_px 64
    write(photos / "b/copy.jpg", (photos / "a/astronaut.jpg").read_bytes())  # the same photo as a's
    write(photos / "b/broken.jpg", (photos / "a/astronaut.jpg").read_bytes()[:300])  # truncated
    write(tmp_path / "params.yaml", "codec:\n  name: pixels\n")
    # The stages as dvc.yaml runs them (in this process, to save interpreter starts); no filter rejects here.
    monkeypatch.chdir(tmp_path)
    main_of("ingest", ["--domain", "a=photos/a", "--domain", "b=photos/b", "--out", "curated/manifest.parquet", "--store", "store/ingest"])
    main_of("caption", ["--manifest", "curated/manifest.parquet", "--out", "curated/dataset.parquet", "--store", "store/caption"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main_of("cache", ["--resolution", "16", "--dataset", "curated/dataset.parquet", "--out", "cache/16", "--stats", "cache/16-run.json"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert "error: domain b (params.yaml data.domains.b) has no image left after curation in curated/dataset.parquet; " in err
    assert "rejected in manifest.parquet: 1 corrupt header, 1 duplicate, 1 too small" in err  # all three of its files
    assert not (tmp_path / "cache/16").exists() and not (tmp_path / "cache/16-run.json").exists()  # before any work


def main_of(module: str, args: list[str]) -> None:
    """``python -m stages.<module> ARGS`` in this process."""
    import runpy
    import sys

    argv = sys.argv
    sys.argv = [f"stages/{module}.py", *args]
    try:
        runpy.run_module(f"stages.{module}", run_name="__main__", alter_sys=True)
    finally:
        sys.argv = argv


def test_a_full_disk_while_writing_a_shard_keeps_the_previous_shards_and_the_rerun_continues(tmp_path, monkeypatch):
    """RLIMIT_FSIZE makes a write past the limit fail with EFBIG, as on a full disk (tests/test_data_safety.py).
    The failing write is the riskiest one: replacing the newest, partly full shard with itself plus new rows."""
    import sys

    from conftest import ROOT
    from stagewise.curation.ingest import IngestConfig, ingest
    from test_data_safety import capped

    sources = [("astronaut", (140, 40, 340, 240)), ("chelsea", (60, 20, 300, 260)), ("coffee", (100, 0, 500, 400)),
               ("hubble_deep_field", (0, 0, 400, 400)), ("immunohistochemistry", (0, 0, 300, 300)), ("retina", (300, 300, 1100, 1100)),
               ("hubble_deep_field", (400, 400, 800, 800)), ("coffee", (200, 0, 600, 400))]  # fmt: skip
    for i, (name, box) in enumerate(sources):
        write(tmp_path / "photos" / "ab"[i % 2] / f"{i}.jpg", photo(name, box))
    manifest, _ = ingest({d: tmp_path / "photos" / d for d in "ab"}, IngestConfig(), tmp_path / "store/ingest")
    dataset = manifest[manifest["status"] == "kept"].assign(caption="a photo")
    assert len(dataset) == 8
    dataset.groupby("domain").head(2).iloc[:3].to_parquet(tmp_path / "first.parquet")  # 3 images of both domains, 6 rows with flips
    dataset.to_parquet(tmp_path / "all.parquet")
    row_mb = 3 * 32 * 32 * 2 / 2**20  # float16 pixels at 32 px
    write(tmp_path / "params.yaml", f"codec:\n  name: pixels\ncache:\n  resolutions: [32]\n  shard_mb: {4 * row_mb}\n  batch_size: 2\n  workers: 1\n")
    monkeypatch.chdir(tmp_path)
    args = ["--resolution", "32", "--out", "cache/32", "--stats", "cache/32-run.json"]

    main_of("cache", [*args, "--dataset", "first.parquet"])
    shards = {p.name: p.read_bytes() for p in sorted((tmp_path / "cache/32").glob("shard-*.parquet"))}
    assert list(shards) == ["shard-00000.parquet", "shard-00001.parquet"]  # 4 rows, then 2: the newest is partly full
    limit = (len(shards["shard-00000.parquet"]) + len(shards["shard-00001.parquet"])) // 2  # a 2-row shard fits, 4 rows do not

    full = subprocess_run([sys.executable, "-m", "stages.cache", *args, "--dataset", "all.parquet"], tmp_path, ROOT, capped(limit))
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-2000:]
    assert "error: " in full.stderr and "File too large. The disk (or a size limit) is full" in full.stderr, full.stderr[-1500:]
    assert {p.name: p.read_bytes() for p in sorted((tmp_path / "cache/32").glob("shard-*.parquet"))} == shards  # whole, unchanged
    assert len(read_index(tmp_path / "cache/32")) == 6  # and readable
    assert len(read_parquet_dir(tmp_path / "store/ingest")) == 8  # the memo store of the stage before, too

    main_of("cache", [*args, "--dataset", "all.parquet"])  # room again: the same command continues
    stats = json.loads((tmp_path / "cache/32-run.json").read_text())
    assert (stats["rows_reused"], stats["rows_encoded"], stats["images_failed"]) == (6, 10, 0)
    index = read_index(tmp_path / "cache/32")
    assert len(index) == 16 and not index.duplicated(["sha256", "flipped"]).any() and set(index["sha256"]) == set(dataset["sha256"])
    assert not [p for p in (tmp_path / "cache/32").iterdir() if not p.name.startswith("shard-")]  # no temp file left


def subprocess_run(cmd: list[str], cwd: Path, root: Path, preexec):
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, preexec_fn=preexec)
