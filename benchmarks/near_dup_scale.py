"""How the near-duplicate pair search scales, against the brute-force comparison measured in the same run.

Hashes: 256-bit (near_dup's default phash, hash_size 16), uniformly random, with 1 % of the images planted
as near copies (a few bits flipped) so there is something to find. Real photo hashes are less uniform
than that (which makes chunk buckets fuller); the second table therefore also runs on real hashes of the
evaluation photos (clean + stamped, see watermark_eval.py) when --images is given.
Embeddings: 512-d unit vectors (ViT-B-32's width), 1 % planted near copies, cosine >= 0.95.

    .venv/bin/python benchmarks/near_dup_scale.py                       # 10k, 30k, 100k hashes; 5k-20k embeddings
    .venv/bin/python benchmarks/near_dup_scale.py --sizes 1000 10000 --embedding-sizes 2000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stagewise.curation.neardup import components, cosine_pairs, hamming, hash_pairs  # noqa: E402

BITS, MAX_DISTANCE = 256, 12


def planted_hashes(n: int, rng: np.random.Generator) -> np.ndarray:
    words = rng.integers(0, 2**63, size=(n, BITS // 64), dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, size=(n, BITS // 64), dtype=np.uint64)
    for a, b in rng.integers(0, n, size=(n // 100, 2)):
        words[b] = words[a]
        for bit in rng.choice(BITS, int(rng.integers(0, MAX_DISTANCE + 1)), replace=False):
            words[b, bit // 64] ^= np.uint64(1) << np.uint64(bit % 64)
    return words


def brute_force_seconds(words: np.ndarray, rows: int) -> float:
    """Seconds for the first ``rows`` rows of the all-pairs comparison (blocked, vectorised popcount);
    the caller scales by the number of pairs."""
    start = time.perf_counter()
    for a in range(rows):
        np.bitwise_count(words[a] ^ words[a + 1:]).sum(axis=1) <= MAX_DISTANCE
    return time.perf_counter() - start


def hashes_table(sizes: list[int], rng: np.random.Generator) -> None:
    print(f"hash pairs, {BITS}-bit hashes, max_distance {MAX_DISTANCE} (2 shared CPU cores: noisy)")
    print(f"{'images':>8}  {'pairs':>7}  {'multi-index s':>13}  {'union-find s':>12}  {'brute force s':>13}  {'ratio':>6}")
    for n in sizes:
        words = planted_hashes(n, rng)
        start = time.perf_counter()
        i, j, _ = hash_pairs(words, BITS, MAX_DISTANCE)
        search = time.perf_counter() - start
        start = time.perf_counter()
        components(n, i, j)
        grouping = time.perf_counter() - start
        sample_rows = min(n - 1, 400)
        # Rows near the top compare against almost n others: the average row compares with n / 2.
        brute = brute_force_seconds(words, sample_rows) * (n * (n - 1) / 2) / sum(n - 1 - a for a in range(sample_rows))
        print(f"{n:>8}  {len(i):>7}  {search:>13.2f}  {grouping:>12.2f}  {brute:>13.1f}  {brute / search:>5.0f}x"
              f"{'  (brute force extrapolated from ' + str(sample_rows) + ' rows)'}")


def real_hashes_table(folder: Path) -> None:
    import imagehash
    from PIL import Image

    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".png"})
    hexes = [str(imagehash.phash(Image.open(p).convert("RGB"), hash_size=16)) for p in paths]
    from stagewise.curation.neardup import hash_words

    words = hash_words(hexes, BITS)
    start = time.perf_counter()
    i, j, d = hash_pairs(words, BITS, MAX_DISTANCE)
    seconds = time.perf_counter() - start
    all_i, all_j = np.triu_indices(len(words), 1)
    want = int((hamming(words, all_i, all_j) <= MAX_DISTANCE).sum())
    print(f"\nreal hashes of {len(words)} images in {folder}: {len(i)} pairs (brute force finds {want}) in {seconds:.3f} s")


def embeddings_table(sizes: list[int], rng: np.random.Generator, dim: int = 512) -> None:
    print(f"\nCLIP cosine pairs, {dim}-d float32, blocked product of 512 rows, cosine >= 0.95")
    print(f"{'images':>8}  {'pairs':>7}  {'seconds':>8}  {'100k extrapolated (N^2) s':>26}")
    for n in sizes:
        vectors = rng.normal(size=(n, dim)).astype(np.float32)
        copies = rng.integers(0, n, size=(n // 100, 2))
        vectors[copies[:, 1]] = vectors[copies[:, 0]] + 0.1 * rng.normal(size=(len(copies), dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        start = time.perf_counter()
        i, _, _ = cosine_pairs(vectors, 0.95, 512)
        seconds = time.perf_counter() - start
        print(f"{n:>8}  {len(i):>7}  {seconds:>8.2f}  {seconds * (100_000 / n) ** 2:>26.0f}")


def rerun_table(n: int, rng: np.random.Generator) -> None:
    """The near_dup stage's rerun at n images with every hash memoised: store lookup + pair search +
    grouping + the output frame (what `dvc repro` pays when one image was added to n)."""
    import tempfile

    import pandas as pd

    from stagewise.curation.neardup import NearDupConfig, find_near_duplicates, hash_fingerprint
    from stagewise.store import ResultStore

    cfg = NearDupConfig()
    words = planted_hashes(n, rng)
    hexes = [format(sum(int(w) << (64 * k) for k, w in enumerate(row)), f"0{BITS // 4}x") for row in words]
    shas = [f"{i:064x}" for i in range(n)]
    manifest = pd.DataFrame({"path": [f"/images/{i:07d}.jpg" for i in range(n)], "domain": "a", "sha256": shas,
                             "width": rng.integers(256, 2048, n), "height": rng.integers(256, 2048, n), "status": "kept"})
    with tempfile.TemporaryDirectory() as tmp:
        with ResultStore(Path(tmp), hash_fingerprint(cfg), flush_every=n) as store:
            for sha, h, sharp in zip(shas, hexes, rng.uniform(10, 500, n)):
                store.add(sha, phash=h, sharpness=float(sharp))
        start = time.perf_counter()
        frame, counts = find_near_duplicates(manifest, cfg, Path(tmp))
        seconds = time.perf_counter() - start
    assert counts["hashed"] == 0
    print(f"\nnear_dup rerun at {n} images, all hashes memoised: {seconds:.1f} s "
          f"({counts['groups']} groups, {(frame['status'] == 'rejected').sum()} rejected)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    parser.add_argument("--embedding-sizes", type=int, nargs="+", default=[5_000, 10_000, 20_000])
    parser.add_argument("--rerun-size", type=int, default=100_000, help="images in the memoised-rerun measurement (0: skip)")
    parser.add_argument("--images", type=Path, help="a folder of images whose real phashes are searched too (e.g. watermark_eval.py --work DIR's images)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    hashes_table(args.sizes, rng)
    if args.images:
        real_hashes_table(args.images)
    embeddings_table(args.embedding_sizes, rng)
    if args.rerun_size:
        rerun_table(args.rerun_size, rng)


if __name__ == "__main__":
    main()
