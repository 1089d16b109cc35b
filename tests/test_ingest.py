import json
import os
import shutil
import stat
import zlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stagewise.curation.ingest import IngestConfig, ingest


def by_name(manifest):
    return {os.path.basename(p): row for p, row in zip(manifest["path"], manifest.to_dict("records"))}


def test_sample_defects_rejected_with_reasons(sample_dir, tmp_path):
    manifest, decoded = ingest({"a": sample_dir / "a", "b": sample_dir / "b"}, IngestConfig(), tmp_path / "store")
    rows = by_name(manifest)
    assert rows["a_empty.jpg"]["reason"] == "empty: 0 bytes"
    assert rows["b_notes.jpg"]["reason"].startswith("not an image")
    assert rows["b_truncated.jpg"]["reason"].startswith("truncated or corrupt")
    assert rows["b_tiny.jpg"]["reason"] == "too small: 40x40 px < min_side_px 64"
    assert rows["a_copy_of_004.jpg"]["reason"] == f"duplicate: same content as {sample_dir / 'a' / 'a_004.jpg'}"
    defects = json.loads((sample_dir / "defects.json").read_text())
    rejected = {os.path.basename(p) for p in manifest.loc[manifest.status == "rejected", "path"]}
    expected = {os.path.basename(p) for kind, paths in defects.items() if kind != "watermark" for p in paths}
    assert rejected == expected  # nothing clean rejected; watermarks are the next stage's job
    assert set(manifest.columns) >= {"path", "domain", "sha256", "width", "height", "format", "status", "reason"}
    assert decoded == manifest["sha256"].nunique()  # each distinct content decoded once: the duplicate is not


def write_image(path, mode, size=(96, 80), **save):
    rng = np.random.default_rng(zlib.crc32(str(path).encode()))  # distinct content per name
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).convert(mode)
    img.save(path, **save)


@pytest.mark.parametrize(
    "name, mode, save",
    [
        ("gray.png", "L", {}),
        ("rgba.png", "RGBA", {}),
        ("cmyk.jpg", "CMYK", {}),
        ("deep.png", "I;16", {}),
        ("palette.png", "P", {"transparency": 0}),
    ],
)
def test_modes_are_converted_and_kept(tmp_path, name, mode, save):
    folder = tmp_path / "in"
    folder.mkdir()
    write_image(folder / name, mode, **save)
    manifest, _ = ingest({"a": folder}, IngestConfig(), tmp_path / "store")
    row = manifest.iloc[0]
    assert (row["status"], row["width"], row["height"], row["mode"]) == ("kept", 96, 80, Image.open(folder / name).mode)


def test_exif_orientation_applied(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    img = Image.new("RGB", (120, 80), "red")
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(folder / "rotated.jpg", exif=exif)
    row = ingest({"a": folder}, IngestConfig(), tmp_path / "store")[0].iloc[0]
    assert (row["width"], row["height"]) == (80, 120)


def test_decompression_bomb_header_rejected_without_decoding(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    # A PNG header claiming 40000 x 40000 pixels with almost no data.
    Image.new("1", (40000, 40000)).save(folder / "bomb.png", optimize=True)
    row = ingest({"a": folder}, IngestConfig(), tmp_path / "store")[0].iloc[0]
    assert row["status"] == "rejected" and row["reason"].startswith("too large: 40000x40000")


def test_input_folders_are_never_written(sample_dir, tmp_path):
    folder = tmp_path / "ro"
    shutil.copytree(sample_dir, folder)
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}
    for p in [folder, *folder.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        manifest, _ = ingest({"a": folder / "a", "b": folder / "b"}, IngestConfig(), tmp_path / "store")
    finally:
        for p in [folder, *folder.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    assert (manifest.status == "kept").sum() > 0
    assert before == {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


def test_only_new_files_are_decoded(sample_dir, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(sample_dir / "a", folder)
    out = tmp_path / "manifest.parquet"
    first, decoded_first = ingest({"a": folder}, IngestConfig(), tmp_path / "store")
    first.to_parquet(out)
    for index in range(3):
        write_image(folder / f"new_{index}.png", "RGB")
    second, decoded_second = ingest({"a": folder}, IngestConfig(), tmp_path / "store", previous_manifest=out)
    assert decoded_second == 3
    assert len(second) == len(first) + 3
    unchanged = second[second["path"].isin(first["path"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(unchanged, first)


def test_missing_domain_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="domain 'b'"):
        ingest({"b": tmp_path / "nope"}, IngestConfig(), tmp_path / "store")
