"""Near-duplicates: group images that are the same picture (resized, recompressed, lightly edited) and keep one.

Two signals, each optional after the first:

- a perceptual hash (imagehash; ``phash`` by default) on every image, compared by Hamming distance;
- CLIP image-embedding cosine, when ``near_dup.clip`` names a model (embeddings are shared with the
  watermark cascade through one CLIP store, see ``stagewise.curation.clip``).

Pairs within ``max_distance`` bits or above ``min_cosine`` are linked, and linked images form groups
(connected components: union-find). Each group keeps one image: one that earlier filters kept (an
``--upstream`` filter's rejected images are grouped too, so a watermarked copy names its clean twin,
but never win over it), then the most pixels, then the sharpest (variance of the Laplacian), then the
first path. The others are rejected with a reason naming the kept twin and the evidence.

Scale: the hashes are compared with multi-index hashing (split the bits into ``max_distance + 1``
chunks; by the pigeonhole principle two hashes within ``max_distance`` agree exactly on at least one
chunk, so only images sharing a chunk value are compared) and the embeddings with a blocked matrix
product, so 100 000 images never build an N x N matrix. Hashes and sharpness are memoised per content
hash; the grouping is cheap and recomputed every run.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from PIL import Image
from pydantic import Field

from stagewise.config import Section, fingerprint
from stagewise.curation.clip import ClipConfig, Embedder
from stagewise.images import load_verified
from stagewise.store import ResultStore, memo_map

log = logging.getLogger(__name__)

HASH_VERSION = 1  # bump when what is hashed changes (decode, colour conversion, sharpness size)
DECIDED_BY = "near_dup"
DECIDED_BY_DECODE = "decode"
COLUMNS = ["path", "domain", "sha256", "status", "reason", "group", "group_size", "kept_path", "phash", "sharpness",
           "phash_distance", "clip_cosine", "decided_by"]
# Sharpness is measured on the image shrunk to this longer side: enough to rank a crisp copy above a
# blurred one, bounded cost on 40 Mpx photos. Ties only matter between equal pixel counts anyway.
SHARPNESS_SIDE_PX = 1024
BIG_RUN = 64  # hash-chunk runs longer than this are compared blockwise instead of by shifted offsets


class NearDupConfig(Section):
    hash: Literal["phash", "dhash", "average_hash", "whash"] = "phash"  # imagehash function
    # 16 -> 256-bit hashes. Measured on the sample: a 0.3x resize + JPEG q50 copy is 0-2 bits away, the
    # three watermarked copies 8-12, distinct crops of the same photo >= 22. At 8 (64 bits) distinct
    # crops were 2 bits apart, as close as the watermarked copies: too coarse to tell them apart.
    hash_size: int = Field(16, ge=4, le=32)
    max_distance: int = Field(12, ge=0, description="Hamming distance (bits) at or below which two hashes are near-duplicates")
    clip: ClipConfig | None = Field(None, description="also link images whose CLIP embeddings are close; null: hashes only")
    min_cosine: float = Field(0.95, gt=0, le=1, description="CLIP cosine at or above which two images are near-duplicates")
    # 512: the product block is 512 x N x 4 bytes, 200 MB at 100 000 images; larger blocks were no faster.
    block_rows: int = Field(512, ge=1, description="rows per block of the embedding product: memory is block_rows x N x 4 bytes")
    workers: int = Field(2, ge=1, description="threads decoding and hashing; PIL releases the GIL while decoding")
    max_pixels: int = Field(8192 * 8192, ge=1, description="decompression-bomb guard; keep equal to ingest.max_pixels")


def hash_fingerprint(cfg: NearDupConfig) -> str:
    from importlib.metadata import version

    return fingerprint("near-dup-hash", HASH_VERSION, version("imagehash"), cfg.hash, cfg.hash_size, SHARPNESS_SIDE_PX)


# ------------------------------------------------------------------------------------------ per image


def image_hash(img: Image.Image, cfg: NearDupConfig) -> str:
    import imagehash

    return str(getattr(imagehash, cfg.hash)(img, hash_size=cfg.hash_size))


def sharpness(img: Image.Image) -> float:
    """Variance of the Laplacian of the grey image: blur and heavy compression lower it."""
    if max(img.size) > SHARPNESS_SIDE_PX:
        img = img.copy()
        img.thumbnail((SHARPNESS_SIDE_PX, SHARPNESS_SIDE_PX), Image.BICUBIC)
    g = np.asarray(img.convert("L"), dtype=np.float32)
    if min(g.shape) < 3:
        return 0.0
    lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    return float(lap.var())


def hash_new(rows: pd.DataFrame, cfg: NearDupConfig, store_dir: Path) -> tuple[dict, dict[str, str], int]:
    """(sha256 -> {phash, sharpness}, decode errors, how many images were hashed this run)."""

    def hashes(row) -> dict:  # in a decoding thread
        img = load_verified(row.path, row.sha256, cfg.max_pixels)
        return {"phash": image_hash(img, cfg), "sharpness": sharpness(img)}

    result = memo_map(rows, ResultStore(store_dir, hash_fingerprint(cfg)), hashes, workers=cfg.workers, desc="near_dup hash")
    return result.values, result.errors, result.computed


# ------------------------------------------------------------------------------------------------ pairs


def hash_words(hex_hashes: list[str], bits: int) -> np.ndarray:
    """Hex hashes -> uint64 words [N, ceil(bits / 64)] (zero-padded), for vectorised popcounts."""
    n_words = max(1, math.ceil(bits / 64))
    out = np.zeros((len(hex_hashes), n_words), dtype=np.uint64)
    for i, h in enumerate(hex_hashes):
        value = int(h, 16)
        for w in range(n_words):
            out[i, w] = (value >> (64 * w)) & 0xFFFF_FFFF_FFFF_FFFF
    return out


def hamming(words: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    return np.bitwise_count(words[i] ^ words[j]).sum(axis=1).astype(np.int64)


def chunk_keys(words: np.ndarray, bits: int, n_chunks: int) -> np.ndarray:
    """[N, n_chunks] int64: the value of each of ``n_chunks`` near-equal bit slices of every hash."""
    as_bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, :bits]
    edges = np.linspace(0, bits, n_chunks + 1).round().astype(int)
    keys = np.zeros((len(words), n_chunks), dtype=np.int64)
    for c in range(n_chunks):
        part = as_bits[:, edges[c]:edges[c + 1]].astype(np.int64)
        keys[:, c] = part @ (np.int64(1) << np.arange(part.shape[1], dtype=np.int64))
    return keys


def hash_pairs(words: np.ndarray, bits: int, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (i < j) within ``max_distance`` bits, with its distance; without comparing all pairs.

    Pigeonhole: split the bits into max_distance + 1 chunks; a pair within max_distance differs in at
    most max_distance chunks, so it agrees on one. Per chunk, sort by the chunk's value and compare only
    images in the same run; a pair is counted in the first chunk it agrees on, so once.
    """
    n = len(words)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    # More chunks than max_distance + 1 keep the guarantee (a pair still agrees on >= 1 chunk); at least
    # ceil(bits / 62) so every chunk's value fits an int64.
    n_chunks = min(max(max_distance + 1, math.ceil(bits / 62)), bits)
    keys = chunk_keys(words, bits, n_chunks)
    empty = np.zeros(0, np.int64)
    found_i, found_j, found_d = [empty], [empty], [empty]  # no image may share a chunk value with another
    for c in range(n_chunks):
        order = np.argsort(keys[:, c], kind="stable")
        sorted_keys = keys[order, c]
        for i, j in _same_key_pairs(order, sorted_keys):
            lo, hi = np.minimum(i, j), np.maximum(i, j)
            if c:  # counted already in an earlier chunk they agree on
                first = ~(keys[lo, :c] == keys[hi, :c]).any(axis=1)
                lo, hi = lo[first], hi[first]
            d = hamming(words, lo, hi)
            keep = d <= max_distance
            found_i.append(lo[keep])
            found_j.append(hi[keep])
            found_d.append(d[keep])
    return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d)


def _same_key_pairs(order: np.ndarray, sorted_keys: np.ndarray):
    """Index pairs (arrays) of rows sharing a key. Short runs by shifted comparison (vectorised over all
    runs at once), runs longer than BIG_RUN blockwise, so a huge run (say 10 000 flat grey images) costs
    its own pairs and nothing more."""
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    lengths = np.diff(np.r_[starts, len(sorted_keys)])
    in_big = np.repeat(lengths > BIG_RUN, lengths)
    longest_small = int(lengths[lengths <= BIG_RUN].max(initial=1))
    for shift in range(1, longest_small):
        same = (sorted_keys[shift:] == sorted_keys[:-shift]) & ~in_big[shift:]
        if not same.any():
            break
        idx = np.flatnonzero(same)
        yield order[idx], order[idx + shift]
    for start, length in zip(starts[lengths > BIG_RUN], lengths[lengths > BIG_RUN]):
        members = order[start:start + length]
        for a in range(0, length, 1024):  # 1024 rows x run length booleans at a time
            rows = np.arange(a, min(a + 1024, length))
            ii, jj = np.nonzero(np.arange(length)[None, :] > rows[:, None])
            yield members[rows[ii]], members[jj]


def cosine_pairs(vectors: np.ndarray, min_cosine: float, block_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (i < j) of unit rows with cosine >= ``min_cosine``: a blocked upper-triangular product,
    memory block_rows x N, never N x N."""
    found_i, found_j, found_c = [], [], []
    n = len(vectors)
    for a in range(0, n, block_rows):
        sims = vectors[a:a + block_rows] @ vectors[a:].T  # rows a.., columns a..
        ii, jj = np.nonzero(sims >= min_cosine)
        upper = jj > ii  # j is offset by a like i: column jj is image a + jj
        found_i.append(a + ii[upper])
        found_j.append(a + jj[upper])
        found_c.append(sims[ii[upper], jj[upper]])
    if not found_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_c)


def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Group label per node (union-find over the pairs, path halving)."""
    parent = np.arange(n)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(i.tolist(), j.tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(x) for x in range(n)])


# ------------------------------------------------------------------------------------------------ stage


@dataclass
class Candidate:
    path: str
    sha256: str
    pixels: int
    sharpness: float
    eligible: bool  # kept by every upstream filter: may be the group's kept image ahead of ineligible ones


def find_near_duplicates(
    manifest: pd.DataFrame, cfg: NearDupConfig, store_dir: Path, upstream: dict[str, pd.DataFrame] | None = None,
    clip_store: Path | None = None,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """One row per manifest-kept image, kept or rejected as a near-duplicate of a named twin; and this
    run's counts: ``hashed`` (images hashed; the rest were memoised), ``clip_embedded``, ``hash_pairs``,
    ``clip_pairs`` and ``groups``. ``upstream``: filter outputs whose rejected images are grouped but never
    preferred to a twin those filters kept."""
    kept = manifest[manifest["status"] == "kept"].reset_index(drop=True)
    embedder = Embedder(cfg.clip, Path(clip_store or Path(store_dir) / "clip"), "near_dup.clip") if cfg.clip is not None else None
    memo, errors, hashed = hash_new(kept, cfg, Path(store_dir))
    vectors: dict[str, np.ndarray] = {}
    clip_embedded = 0
    if embedder is not None:
        result = embedder.images(kept[~kept["sha256"].isin(errors)], desc="near_dup clip")
        errors.update(result.errors)
        vectors, clip_embedded = result.embeddings, result.embedded

    rejected_upstream: set[tuple[str, str]] = set()
    for frame in (upstream or {}).values():
        rejected_upstream |= set(zip(frame.loc[frame["status"] != "kept", "path"], frame.loc[frame["status"] != "kept", "sha256"]))

    nodes = kept[~kept["sha256"].isin(errors)].reset_index(drop=True)  # one node per row: copies at two paths are twins too
    cands = [Candidate(r.path, r.sha256, int(r.width) * int(r.height), float(memo[r.sha256]["sharpness"]), (r.path, r.sha256) not in rejected_upstream)
             for r in nodes.itertuples(index=False)]
    bits = cfg.hash_size * cfg.hash_size
    words = hash_words([memo[c.sha256]["phash"] for c in cands], bits)
    hi, hj, _ = hash_pairs(words, bits, cfg.max_distance)
    ci = cj = np.zeros(0, np.int64)
    matrix = None
    if vectors:
        matrix = np.stack([vectors[c.sha256] for c in cands]).astype(np.float32) if cands else np.zeros((0, 1), np.float32)
        ci, cj, _ = cosine_pairs(matrix, cfg.min_cosine, cfg.block_rows)
    labels = components(len(cands), np.r_[hi, ci], np.r_[hj, cj])
    adjacency: dict[int, set[int]] = {}
    for a, b in zip(np.r_[hi, ci].tolist(), np.r_[hj, cj].tolist()):
        adjacency.setdefault(a, set()).add(b)
        adjacency.setdefault(b, set()).add(a)

    alone = {"status": "kept", "reason": "", "group": -1, "group_size": 1, "kept_path": "", "phash_distance": math.nan, "clip_cosine": math.nan}
    decisions: dict[int, dict] = {}
    sizes = np.bincount(labels, minlength=len(cands)) if len(cands) else np.zeros(0, int)
    linked = np.flatnonzero(sizes[labels] > 1) if len(cands) else np.zeros(0, int)  # singletons need no loop
    order = linked[np.argsort(labels[linked], kind="stable")]
    n_groups = 0
    for members in np.split(order, np.flatnonzero(np.diff(labels[order])) + 1) if len(order) else []:
        members = members.tolist()
        n_groups += 1
        label = int(labels[members[0]])
        best = min(members, key=lambda m: (not cands[m].eligible, -cands[m].pixels, -cands[m].sharpness, cands[m].path))
        parents = _bfs_parents(best, adjacency)
        for m in members:
            d = int(hamming(words, np.array([m]), np.array([best]))[0])
            cos = float(matrix[m] @ matrix[best]) if matrix is not None else math.nan
            row = {"group": label, "group_size": len(members), "kept_path": cands[best].path, "phash_distance": d, "clip_cosine": cos}
            if m == best:
                decisions[m] = {**row, "status": "kept", "reason": "", "kept_path": ""}
                continue
            decisions[m] = {**row, "status": "rejected", "reason": _reason(m, best, parents, cands, words, matrix, cfg)}

    rows = []
    node_of = {(c.path, c.sha256): k for k, c in enumerate(cands)}
    for r in kept.itertuples(index=False):
        base = {"path": r.path, "domain": r.domain, "sha256": r.sha256}
        if r.sha256 in errors:
            rows.append({**base, "status": "rejected", "reason": errors[r.sha256], "group": -1, "group_size": 0, "kept_path": "", "phash": "",
                         "sharpness": math.nan, "phash_distance": math.nan, "clip_cosine": math.nan, "decided_by": DECIDED_BY_DECODE})
            continue
        k = node_of[(r.path, r.sha256)]
        rows.append({**base, **decisions.get(k, alone), "phash": memo[r.sha256]["phash"], "sharpness": cands[k].sharpness, "decided_by": DECIDED_BY})
    frame = pd.DataFrame(rows, columns=COLUMNS).astype({"group": "int64", "group_size": "int64", "sharpness": "float64", "phash_distance": "float64", "clip_cosine": "float64"})
    return frame, {"hashed": hashed, "hash_pairs": len(hi), "clip_pairs": len(ci), "clip_embedded": clip_embedded, "groups": n_groups}


def _bfs_parents(root: int, adjacency: dict[int, set[int]]) -> dict[int, int]:
    parents, queue = {root: root}, deque([root])
    while queue:
        node = queue.popleft()
        for nxt in sorted(adjacency.get(node, ())):
            if nxt not in parents:
                parents[nxt] = node
                queue.append(nxt)
    return parents


def _evidence(a: int, b: int, words: np.ndarray, matrix: np.ndarray | None, cfg: NearDupConfig) -> str:
    d = int(hamming(words, np.array([a]), np.array([b]))[0])
    if d <= cfg.max_distance or matrix is None:
        return f"{cfg.hash} distance {d}"
    return f"CLIP cosine {float(matrix[a] @ matrix[b]):.3f}"


def _reason(m: int, best: int, parents: dict[int, int], cands: list[Candidate], words: np.ndarray, matrix: np.ndarray | None, cfg: NearDupConfig) -> str:
    """Names the kept twin; when the link is a chain (A ~ B ~ C, A not close to C), names the next link too."""
    parent = parents[m]
    if parent == best:
        return f"near-duplicate: of {cands[best].path} ({_evidence(m, best, words, matrix, cfg)})"
    return f"near-duplicate: of {cands[best].path} through {cands[parent].path} ({_evidence(m, parent, words, matrix, cfg)})"


def summarize(frame: pd.DataFrame, counts: dict[str, int]) -> str:
    rejected = frame[frame["status"] != "kept"]
    lines = [f"{len(frame) - len(rejected)} kept, {len(rejected)} rejected of {len(frame)} images; {counts['groups']} near-duplicate groups"]
    for row in rejected.head(20).itertuples(index=False):
        lines.append(f"  {row.path}: {row.reason}")
    if len(rejected) > 20:
        lines.append(f"  ... and {len(rejected) - 20} more")
    return "\n".join(lines)
