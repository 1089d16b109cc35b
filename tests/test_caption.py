"""The caption stage: sidecar precedence, the captioner interface and its memo, filter combination, and
one real `dvc repro` proving a watermark threshold change reruns watermark and caption but not ingest."""

import json
import os
import re
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import ROOT, dvc, make_project, run, set_params
from stagewise.config import ParamsError, fingerprint, parse_section
from stagewise.curation.caption import CaptionConfig, Captioner, TemplateCaptioner, caption_dataset, make_captioner, select_kept
from stagewise.curation.ingest import IngestConfig, ingest


def write_images(folder, names, size=(72, 64)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(names))
    for name in names:
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name)


def by_name(frame):
    return {os.path.basename(p): r for p, r in zip(frame["path"], frame.to_dict("records"))}


def test_sidecar_precedence_and_template(tmp_path):
    folder = tmp_path / "faces"
    write_images(folder, ["txt.jpg", "cap.png", "both.jpg", "empty_txt.jpg", "blank.jpg", "none.jpg"])
    (folder / "txt.txt").write_text("  from the txt sidecar \n")
    (folder / "cap.caption").write_text("from the caption sidecar\n")
    (folder / "both.txt").write_text("txt wins")
    (folder / "both.caption").write_text("caption loses")
    (folder / "empty_txt.txt").write_text("")
    (folder / "empty_txt.caption").write_text("empty txt falls through to .caption")
    (folder / "blank.txt").write_text(" \n\t\n")
    manifest, _ = ingest({"alice": folder}, IngestConfig(), tmp_path / "ingest")
    captioner = TemplateCaptioner("a photo of {domain}, {stem}")
    dataset, counts = caption_dataset(manifest, {}, captioner, tmp_path / "store")
    rows = by_name(dataset)
    assert {k: (r["caption"], r["caption_source"]) for k, r in rows.items()} == {
        "txt.jpg": ("from the txt sidecar", "sidecar"),
        "cap.png": ("from the caption sidecar", "sidecar"),
        "both.jpg": ("txt wins", "sidecar"),
        "empty_txt.jpg": ("empty txt falls through to .caption", "sidecar"),
        "blank.jpg": ("a photo of alice, blank", "template"),
        "none.jpg": ("a photo of alice, none", "template"),
    }
    assert list(dataset.columns) == ["path", "domain", "sha256", "width", "height", "caption", "caption_source"]
    assert (dataset["width"] == 72).all() and (dataset["height"] == 64).all()
    assert counts["sidecar"] == 4 and counts["captioned"] == 2

    (folder / "txt.txt").write_text("edited sidecar")  # always re-read: an edit shows up on the next run
    again, counts = caption_dataset(manifest, {}, captioner, tmp_path / "store")
    assert by_name(again)["txt.jpg"]["caption"] == "edited sidecar"
    assert counts["captioned"] == 0 and counts["memoised"] == 2


def test_sample_sidecars(sample_dir, tmp_path):
    manifest, _ = ingest({"a": sample_dir / "a", "b": sample_dir / "b"}, IngestConfig(), tmp_path / "ingest")
    dataset, _ = caption_dataset(manifest, {}, make_captioner(CaptionConfig()), tmp_path / "store")
    rows = by_name(dataset)
    assert rows["a_000.jpg"]["caption"] == (sample_dir / "a" / "a_000.txt").read_text().strip()
    assert rows["b_000.jpg"]["caption"] == (sample_dir / "b" / "b_000.caption").read_text().strip()
    assert rows["a_001.jpg"]["caption"] == "a photo of a" and rows["b_001.jpg"]["caption"] == "a photo of b"
    assert len(dataset) == (manifest["status"] == "kept").sum()


def test_template_memo_keyed_by_fingerprint_and_context(tmp_path):
    folder = tmp_path / "in"
    write_images(folder, ["x.jpg", "y.jpg", "z.jpg"])
    store = tmp_path / "store"
    manifest, _ = ingest({"a": folder}, IngestConfig(), tmp_path / "ingest")
    _, counts = caption_dataset(manifest, {}, TemplateCaptioner("{domain}: {stem}"), store)
    assert counts["captioned"] == 3
    write_images(folder / "more", ["w.jpg"], size=(80, 80))
    manifest, _ = ingest({"a": folder}, IngestConfig(), tmp_path / "ingest")
    _, counts = caption_dataset(manifest, {}, TemplateCaptioner("{domain}: {stem}"), store)
    assert (counts["captioned"], counts["memoised"]) == (1, 3)  # only the new image
    (folder / "x.jpg").rename(folder / "renamed.jpg")  # same content, new stem: the template's context changed
    manifest, _ = ingest({"a": folder}, IngestConfig(), tmp_path / "ingest")
    dataset, counts = caption_dataset(manifest, {}, TemplateCaptioner("{domain}: {stem}"), store)
    assert (counts["captioned"], counts["memoised"]) == (1, 3)
    assert by_name(dataset)["renamed.jpg"]["caption"] == "a: renamed"
    _, counts = caption_dataset(manifest, {}, TemplateCaptioner("a picture of {domain}"), store)
    assert counts["captioned"] == 4  # another template is another fingerprint


class MeanColourCaptioner(Captioner):
    """A real pixel-reading captioner (what a model captioner does through the same interface)."""

    def __init__(self):
        self.calls: list[int] = []

    @property
    def fingerprint(self) -> str:
        return fingerprint("mean-colour", 1)

    def caption(self, images, refs):
        self.calls.append(len(images))
        names = ("red", "green", "blue")
        return [f"a mostly {names[int(np.asarray(im).reshape(-1, 3).mean(0).argmax())]} image" for im in images]


def test_pixel_captioner_batches_memoises_and_drops_unreadable(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name, rgb in [("r1.png", (200, 10, 10)), ("g1.png", (10, 200, 10)), ("b1.png", (10, 10, 200)), ("r2.png", (180, 0, 20)), ("g2.png", (0, 190, 30))]:
        Image.new("RGB", (70, 70), rgb).save(folder / name)
    (folder / "b1.txt").write_text("a sidecar beats the model")
    manifest, _ = ingest({"a": folder}, IngestConfig(), tmp_path / "ingest")
    (folder / "g2.png").write_bytes(b"no longer a png")  # broken after ingest
    captioner = MeanColourCaptioner()
    dataset, counts = caption_dataset(manifest, {}, captioner, tmp_path / "store", batch_size=2)
    rows = by_name(dataset)
    assert {k: (r["caption"], r["caption_source"]) for k, r in rows.items()} == {
        "r1.png": ("a mostly red image", "model"), "g1.png": ("a mostly green image", "model"),
        "b1.png": ("a sidecar beats the model", "sidecar"), "r2.png": ("a mostly red image", "model"),
    }
    assert counts["unreadable"] == 1 and counts["captioned"] == 3
    assert captioner.calls == [1, 2]  # batches of 2 in path order: [g1, g2] less the unreadable g2, then [r1, r2]
    second = MeanColourCaptioner()
    _, counts = caption_dataset(manifest, {}, second, tmp_path / "store", batch_size=2)
    assert second.calls == [] and counts["memoised"] == 3


def test_filters_combine(tmp_path):
    folder = tmp_path / "in"
    write_images(folder, [f"{i}.png" for i in range(5)])
    (folder / "bad.png").write_bytes(b"")
    manifest, _ = ingest({"a": folder}, IngestConfig(), tmp_path / "ingest")
    kept = manifest[manifest["status"] == "kept"]
    paths = list(kept["path"])

    def decisions(rejected):
        return pd.DataFrame({"path": paths, "sha256": list(kept["sha256"]), "status": ["rejected" if os.path.basename(p) in rejected else "kept" for p in paths]})

    filters = {"watermark": decisions({"1.png"}), "vlm": decisions({"1.png", "3.png"})}
    dataset, counts = caption_dataset(manifest, filters, TemplateCaptioner("x"), tmp_path / "store")
    assert sorted(by_name(dataset)) == ["0.png", "2.png", "4.png"]  # bad.png was dropped by ingest
    assert counts["dropped_by:watermark"] == 1 and counts["dropped_by:vlm"] == 1  # 1.png is counted by the first only

    stale = decisions(set()).iloc[1:]
    with pytest.raises(ValueError, match=r"filter old: no decision for 1 image\(s\) the manifest kept, e\.g\. .*0\.png .*rerun that stage"):
        select_kept(manifest, {"old": stale})
    with pytest.raises(ValueError, match="filter broken: missing column"):
        select_kept(manifest, {"broken": decisions(set()).drop(columns="status")})


def test_bad_params_name_the_key():
    with pytest.raises(ParamsError, match=r"caption\.template: .*unknown placeholder\(s\) \{name\}"):
        parse_section({"template": "a photo of {name}"}, CaptionConfig, "caption")
    with pytest.raises(ParamsError, match=r"caption\.captioner: .*unknown captioner 'blip'; known: template"):
        parse_section({"captioner": "blip"}, CaptionConfig, "caption")


def stage_ran(out, stage):
    if f"Running stage '{stage}'" in out:
        return True
    assert re.search(rf"Stage '{stage}' didn't change, skipping", out), out
    return False


def test_dvc_threshold_change_reruns_watermark_and_caption_only(tmp_path):
    project = make_project(tmp_path / "project")
    first = dvc(project, "repro", "caption")
    assert all(stage_ran(first.stdout, s) for s in ("domains", "ingest", "watermark", "caption"))
    faces = pd.read_parquet(project / "data/curated/faces.parquet")  # the demo's align stage: crops, by source photo
    source_of = dict(zip(faces["path"], faces["source_path"]))
    dataset = pd.read_parquet(project / "data/curated/dataset.parquet").pipe(lambda d: d.assign(path=d["path"].map(source_of)))
    stamped = {f"data/sample/{p}" for p in json.loads((project / "data/sample/defects.json").read_text())["watermark"]}
    assert not stamped & set(dataset["path"])
    lock_before = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    manifest_mtime = (project / "data/curated/manifest.parquet").stat().st_mtime_ns

    set_params(project / "params.yaml", {"watermark": {"threshold": 0.9}})  # above every stamped copy's score
    second = dvc(project, "repro", "caption")
    ran = {s: stage_ran(second.stdout, s) for s in ("domains", "ingest", "watermark", "caption")}
    assert ran == {"domains": False, "ingest": False, "watermark": True, "caption": True}
    assert "ran the text detector on 0 images" in second.stderr  # decided again from memoised boxes
    lock_after = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert lock_after["ingest"] == lock_before["ingest"] and lock_after["domains"] == lock_before["domains"]
    assert lock_after["watermark"]["params"]["params.yaml"]["watermark"]["threshold"] == 0.9
    assert (project / "data/curated/manifest.parquet").stat().st_mtime_ns == manifest_mtime
    dataset = pd.read_parquet(project / "data/curated/dataset.parquet").pipe(lambda d: d.assign(path=d["path"].map(source_of)))
    assert stamped <= set(dataset["path"])  # the relaxed threshold really reached the dataset
    assert "Data and pipelines are up to date" in dvc(project, "status", "caption").stdout


def test_stage_reports_a_stale_filter_clearly(tmp_path):
    folder = tmp_path / "in"
    write_images(folder, ["0.png", "1.png"])
    manifest, _ = ingest({"a": folder}, IngestConfig(), tmp_path / "ingest")
    manifest.to_parquet(tmp_path / "manifest.parquet")
    manifest.iloc[:1].assign(status="kept").to_parquet(tmp_path / "filter.parquet")  # decides only 0.png
    (tmp_path / "params.yaml").write_text("caption:\n  template: 'x {stem}'\n")
    args = ["--manifest", "manifest.parquet", "--filter", "filter.parquet", "--out", "dataset.parquet", "--store", "store"]
    proc = run([sys.executable, "-m", "stages.caption", *args], tmp_path, check=False, env={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    assert f"error: filter filter.parquet: no decision for 1 image(s) the manifest kept, e.g. {folder / '1.png'}" in proc.stderr
    assert not (tmp_path / "dataset.parquet").exists()
