"""Near-duplicates on real photos: resized / recompressed / blurred copies are grouped with their original,
the larger then sharper image is kept and the others name it; distinct photos are left alone; hashing is
incremental; an upstream filter's rejects never win; CLIP cosine links what the hash misses; and the
sub-quadratic pair search finds exactly the pairs a brute-force comparison finds."""

import io
import json
import sys

import matplotlib.cbook
import numpy as np
import pandas as pd
import pytest
import skimage.data
from PIL import Image, ImageFilter

from conftest import ROOT, run
from stagewise.curation.ingest import IngestConfig, ingest
from stagewise.curation.neardup import NearDupConfig, cosine_pairs, find_near_duplicates, hamming, hash_pairs, sharpness
from stagewise.curation.stamp import Stamp, stamp
from tiny_clip import tiny_clip


def skimage_photo(name):
    arr = getattr(skimage.data, name)()
    return Image.fromarray(arr[0] if isinstance(arr, tuple) else arr).convert("RGB")


def hopper():
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return Image.open(f).convert("RGB")


def jpeg(img, quality):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue()))


def scan(folder, tmp_path):
    return ingest({"a": folder}, IngestConfig(), tmp_path / "ingest")[0]


def by_name(frame):
    return frame.assign(name=frame["path"].str.rsplit("/", n=1).str[-1]).set_index("name")


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("astronaut", "coffee", "rocket", "camera", "immunohistochemistry"):
        skimage_photo(name).save(folder / f"{name}.png")
    jpeg(skimage_photo("astronaut").resize((256, 256), Image.LANCZOS), 60).save(folder / "astronaut_small.jpg", quality=95)
    hopper().save(folder / "hopper.png")
    hopper().filter(ImageFilter.GaussianBlur(1.5)).save(folder / "hopper_blurred.png")  # same size: sharpness decides
    return folder


def test_copies_are_grouped_and_the_best_is_kept(photos, tmp_path):
    frame, counts = find_near_duplicates(scan(photos, tmp_path), NearDupConfig(), tmp_path / "store")
    assert counts["hashed"] == 8
    rows = by_name(frame)
    rejected = rows[rows["status"] == "rejected"]
    assert set(rejected.index) == {"astronaut_small.jpg", "hopper_blurred.png"}

    small = rows.loc["astronaut_small.jpg"]  # a quarter of the pixels: the 512 x 512 original is kept
    assert small["kept_path"] == str(photos / "astronaut.png") and small["group_size"] == 2
    assert small["reason"] == f"near-duplicate: of {photos / 'astronaut.png'} (phash distance {int(small['phash_distance'])})"
    assert 0 <= small["phash_distance"] <= NearDupConfig().max_distance

    blurred, sharp = rows.loc["hopper_blurred.png"], rows.loc["hopper.png"]  # equal pixels: the sharper is kept
    assert blurred["reason"].startswith(f"near-duplicate: of {photos / 'hopper.png'} (phash distance ")
    assert sharp["status"] == "kept" and sharp["sharpness"] > 2 * blurred["sharpness"]
    assert sharp["group"] == blurred["group"] != rows.loc["astronaut.png", "group"]

    distinct = rows.loc[["coffee.png", "rocket.png", "camera.png", "immunohistochemistry.png"]]
    assert (distinct["status"] == "kept").all() and (distinct["group"] == -1).all() and (distinct["reason"] == "").all()
    assert counts["groups"] == 2 and counts["hash_pairs"] == 2


def test_hashing_is_incremental_and_grouping_is_recomputed(photos, tmp_path):
    _, counts = find_near_duplicates(scan(photos, tmp_path), NearDupConfig(), tmp_path / "store")
    assert counts["hashed"] == 8
    skimage_photo("chelsea").save(photos / "chelsea.png")
    frame, counts = find_near_duplicates(scan(photos, tmp_path), NearDupConfig(), tmp_path / "store")
    assert counts["hashed"] == 1 and (by_name(frame).loc["chelsea.png", "status"] == "kept")

    # Grouping settings only: nothing rehashed, decisions change. At distance 0 only exact-hash copies group.
    strict, counts = find_near_duplicates(scan(photos, tmp_path), NearDupConfig(max_distance=0), tmp_path / "store")
    assert counts["hashed"] == 0
    assert set(strict.loc[strict["status"] == "rejected", "phash_distance"]) <= {0.0}
    # A hash setting: every memoised hash is stale.
    _, counts = find_near_duplicates(scan(photos, tmp_path), NearDupConfig(hash="dhash"), tmp_path / "store")
    assert counts["hashed"] == 9


def test_upstream_rejects_never_win_over_a_clean_twin(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    coffee = skimage_photo("coffee")
    coffee.resize((300, 200), Image.LANCZOS).save(folder / "clean.png")
    mark = Stamp(kind="logo", placement="corner", opacity=0.4, size_frac=0.15, colour="white", outline=False, shape="ring-star", corner="bottom-right")
    stamp(coffee.resize((600, 400), Image.LANCZOS), mark).save(folder / "stamped_big.png")  # 4x the pixels
    skimage_photo("rocket").save(folder / "other.png")
    manifest = scan(folder, tmp_path)

    alone, _ = find_near_duplicates(manifest, NearDupConfig(), tmp_path / "store")
    assert by_name(alone).loc["clean.png", "status"] == "rejected"  # on pixels alone the big stamped copy wins

    watermark = manifest[manifest["status"] == "kept"][["path", "sha256"]].assign(status="kept")
    watermark.loc[watermark["path"].str.endswith("stamped_big.png"), "status"] = "rejected"
    frame, counts = find_near_duplicates(manifest, NearDupConfig(), tmp_path / "store", upstream={"watermark": watermark})
    rows = by_name(frame)
    assert counts["hashed"] == 0
    assert rows.loc["clean.png", "status"] == "kept" and rows.loc["other.png", "status"] == "kept"
    assert rows.loc["stamped_big.png", "reason"].startswith(f"near-duplicate: of {folder / 'clean.png'} (phash distance ")


def test_sample_stamped_copies_name_their_clean_originals(sample_dir, tmp_path):
    manifest = ingest({"a": sample_dir / "a", "b": sample_dir / "b"}, IngestConfig(), tmp_path / "ingest")[0]
    stamped = {str(sample_dir / p) for p in json.loads((sample_dir / "defects.json").read_text())["watermark"]}
    kept = manifest[manifest["status"] == "kept"]
    upstream = kept[["path", "sha256"]].assign(status=np.where(kept["path"].isin(stamped), "rejected", "kept"))
    frame, _ = find_near_duplicates(manifest, NearDupConfig(), tmp_path / "store", upstream={"watermark": upstream})
    rejected = frame[frame["status"] == "rejected"]
    assert set(rejected["path"]) <= stamped and len(rejected) >= 2  # no clean crop lost; most stamped copies grouped
    for row in rejected.itertuples():
        original = row.path.replace("_stock.jpg", ".jpg")
        assert row.reason.startswith(f"near-duplicate: of {original} (phash distance "), row.reason


def test_clip_cosine_links_what_the_hash_misses(tmp_path):
    """Black bars over the sides change the whole-image hash a lot (40 of 256 bits) but not the centre
    square CLIP sees: the tiny model's embeddings of the pair are closer than any two distinct photos."""
    folder = tmp_path / "in"
    folder.mkdir()
    coffee = skimage_photo("coffee")  # 600 x 400: CLIP's centre crop is x = 100..500
    coffee.save(folder / "coffee.png")
    bars = np.asarray(coffee).copy()
    bars[:, :90], bars[:, -90:] = 0, 0
    Image.fromarray(bars).save(folder / "coffee_bars.png")
    for name in ("rocket", "astronaut", "chelsea", "camera"):
        skimage_photo(name).save(folder / f"{name}.png")
    manifest = scan(folder, tmp_path)
    clip = tiny_clip(tmp_path / "clip-model")

    probe, _ = find_near_duplicates(manifest, NearDupConfig(clip=clip, min_cosine=1.0), tmp_path / "store")
    from stagewise.curation.clip import ClipConfig, Embedder

    vectors = Embedder(ClipConfig(**clip), tmp_path / "store" / "clip", "near_dup.clip").images(manifest).embeddings  # memoised
    names = by_name(probe)["sha256"]
    pair = float(vectors[names["coffee.png"]].astype(np.float32) @ vectors[names["coffee_bars.png"]].astype(np.float32))
    others = [n for n in names.index if n != "coffee_bars.png"]
    distinct = max(float(vectors[names[a]].astype(np.float32) @ vectors[names[b]].astype(np.float32)) for i, a in enumerate(others) for b in others[i + 1:])
    assert pair > distinct, (pair, distinct)

    cfg = NearDupConfig(clip=clip, min_cosine=(pair + distinct) / 2)
    frame, counts = find_near_duplicates(manifest, cfg, tmp_path / "store")
    rows = by_name(frame)
    assert counts["hashed"] == 0 and counts["clip_embedded"] == 0 and counts["clip_pairs"] == 1  # both memoised
    assert rows.loc["coffee_bars.png", "phash_distance"] > cfg.max_distance  # the hash alone would not link them
    assert rows.loc["coffee_bars.png", "reason"] == f"near-duplicate: of {folder / 'coffee.png'} (CLIP cosine {pair:.3f})"
    assert (rows.drop(index="coffee_bars.png")["status"] == "kept").all()


def test_pair_search_when_no_two_hashes_share_a_chunk():
    """Regression: a few distinct images whose hashes agree on no chunk at all crashed the stage
    (np.concatenate of nothing) -- found by benchmarks/fault_corrupt.py with 23 images."""
    bits, max_distance = 64, 7  # 8 chunks of 8 bits: hashes 0x00.., 0x11.., 0x22.. differ in every chunk
    words = np.array([[int.from_bytes(bytes([k * 17]) * 8, "little")] for k in range(4)], dtype=np.uint64)
    i, j, d = hash_pairs(words, bits, max_distance)
    assert len(i) == len(j) == len(d) == 0 and i.dtype == np.int64


def test_pair_search_matches_brute_force():
    rng = np.random.default_rng(0)
    for bits, max_distance in ((64, 3), (256, 12), (256, 0)):
        n = 2000
        words = rng.integers(0, 2**63, size=(n, bits // 64), dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, size=(n, bits // 64), dtype=np.uint64)
        for _ in range(150):  # planted near pairs, some just beyond max_distance
            a, b = rng.integers(0, n, 2)
            words[b] = words[a]
            for bit in rng.choice(bits, rng.integers(0, max_distance + 3), replace=False):
                words[b, bit // 64] ^= np.uint64(1) << np.uint64(bit % 64)
        words[100:300] = words[100]  # one long run of identical hashes (a folder of flat frames)
        i, j, d = hash_pairs(words, bits, max_distance)
        all_i, all_j = np.triu_indices(n, 1)
        all_d = hamming(words, all_i, all_j)
        want = set(zip(all_i[all_d <= max_distance].tolist(), all_j[all_d <= max_distance].tolist()))
        assert len(i) == len(want) and set(zip(i.tolist(), j.tolist())) == want
        np.testing.assert_array_equal(d, hamming(words, i, j))

    vectors = rng.normal(size=(700, 24)).astype(np.float32)
    vectors[10], vectors[500] = vectors[3] + 0.05, vectors[3] - 0.05
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    i, j, c = cosine_pairs(vectors, 0.9, block_rows=64)  # several blocks, and pairs across blocks
    sims = vectors @ vectors.T
    all_i, all_j = np.triu_indices(700, 1)
    hit = sims[all_i, all_j] >= 0.9
    assert set(zip(i.tolist(), j.tolist())) == set(zip(all_i[hit].tolist(), all_j[hit].tolist())) and len(i) == hit.sum() >= 3
    np.testing.assert_allclose(c, sims[i, j], rtol=1e-5)


def test_sharpness_orders_blur():
    img = skimage_photo("camera")
    assert sharpness(img) > sharpness(img.filter(ImageFilter.GaussianBlur(1))) > sharpness(img.filter(ImageFilter.GaussianBlur(3)))


def test_stage_writes_one_row_per_kept_image(photos, tmp_path):
    manifest = scan(photos, tmp_path)
    manifest.to_parquet(tmp_path / "manifest.parquet")
    (tmp_path / "params.yaml").write_text("near_dup:\n  max_distance: 12\n")
    env = {"PYTHONPATH": str(ROOT)}
    args = ["--manifest", "manifest.parquet", "--out", "near_dup.parquet", "--store", "store"]
    proc = run([sys.executable, "-m", "stages.near_dup", *args], tmp_path, env=env)
    frame = pd.read_parquet(tmp_path / "near_dup.parquet")
    assert list(frame["path"]) == list(manifest.loc[manifest["status"] == "kept", "path"])
    assert (frame["status"] == "rejected").sum() == 2 and "2 near-duplicate groups" in proc.stderr
    missing = run([sys.executable, "-m", "stages.near_dup", *args, "--upstream", "nope.parquet"], tmp_path, check=False, env=env)
    assert missing.returncode == 2 and "error: upstream filter output not found: nope.parquet" in missing.stderr
    (tmp_path / "params.yaml").write_text("near_dup:\n  max_distanse: 3\n")
    typo = run([sys.executable, "-m", "stages.near_dup", *args], tmp_path, check=False, env=env)
    assert typo.returncode == 2 and "near_dup.max_distanse: unknown key" in typo.stderr
