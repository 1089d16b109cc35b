"""Malformed images mixed into good ones, through the whole curation chain and the latent cache.

Builds two domain folders holding ``--per-kind`` files of every kind in ``tests/harness/faults.py`` (truncated
at random offsets, bit flips, wrong extension, zero bytes, 1x1, a 40 000 x 40 000 PNG header, CMYK,
16-bit, palette with transparency, animated GIF, EXIF-rotated, symlink loop, unreadable permissions,
non-UTF-8 file name) plus ``--good`` valid photos, then runs the real stage entry points in the order
DVC does -- ingest, watermark, near_dup, caption, cache (pixels codec, 32 px) -- each as its own
process, and checks:

- no stage crashes (exit 0, no traceback);
- the manifest has exactly one row per file in the folders, each `kept` or `rejected` with a reason;
- every kind lands where ``harness.faults.EXPECTED`` says (a bit flip may go either way);
- every good image is kept all the way into the dataset and the cache, and the cache holds each
  (image, flip) key exactly once;
- the domain folders are byte-for-byte, mtime-for-mtime as they were.

Prints one row per kind (files, kept, rejected, in the dataset, the commonest reason) and the totals.

    .venv/bin/python benchmarks/fault_corrupt.py                  # 10 files per kind, 100 good per domain
    .venv/bin/python benchmarks/fault_corrupt.py --per-kind 3 --good 20
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the corpus of malformed files, shared with the tests

from harness.faults import EXPECTED, expected_for, make_corpus, make_good  # noqa: E402

CACHE_PX = 32


def snapshot(folders: list[Path]) -> dict[bytes, tuple]:
    """Every entry under ``folders`` (names as bytes: some are not UTF-8) with its type, size, mtime and
    content hash, so a write of any kind -- new file, changed byte, touched mtime -- shows as a difference."""
    seen: dict[bytes, tuple] = {}
    for folder in folders:
        for entry in os.scandir(os.fsencode(folder)):
            info = entry.stat(follow_symlinks=False)
            digest = None
            if entry.is_file(follow_symlinks=False) and os.access(entry.path, os.R_OK):
                digest = hashlib.sha256(Path(os.fsdecode(entry.path)).read_bytes()).hexdigest()
            seen[entry.path] = (entry.is_symlink(), info.st_size, info.st_mtime_ns, digest)
    return seen


def manifest_key(path: Path) -> str:
    """How the manifest spells a path: undecodable bytes of a file name as backslash escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def run_stage(name: str, args: list[str], work: Path) -> tuple[bool, float, str]:
    """One stage entry point as its own process: (crashed, seconds, stderr tail)."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", f"stages.{name}", *args, "--params", "params.yaml"], cwd=work, capture_output=True, text=True)
    crashed = proc.returncode != 0 or "Traceback (most recent call last)" in proc.stderr
    return crashed, time.perf_counter() - started, proc.stderr[-2000:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog="Exit status 1 when any check fails.")
    parser.add_argument("--per-kind", type=int, default=10, help="files of each malformed kind per domain (default: %(default)s)")
    parser.add_argument("--good", type=int, default=100, help="valid photos per domain (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated files (default: %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder and print its path")
    args = parser.parse_args()

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="fault_corrupt-"))
    domains = {"a": work / "in" / "a", "b": work / "in" / "b"}
    corpus: dict[str, list[Path]] = {kind: [] for kind in EXPECTED}
    good: list[Path] = []
    for offset, (domain, folder) in enumerate(domains.items()):
        for kind, paths in make_corpus(folder, seed=args.seed * 10 + offset, per_kind=args.per_kind).items():
            corpus[kind] += paths
        good += make_good(folder, args.good, seed=args.seed * 10 + offset + 100)
    before = snapshot(list(domains.values()))

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["codec"]["name"] = "pixels"  # the cache must take every kept pixel mode; no weights needed
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    curated = "curated"
    stages = [
        ("ingest", [a for d, f in domains.items() for a in ("--domain", f"{d}={f}")] + ["--out", f"{curated}/manifest.parquet", "--store", "store/ingest"]),
        ("watermark", ["--manifest", f"{curated}/manifest.parquet", "--out", f"{curated}/watermark.parquet", "--store", "store/watermark"]),
        ("near_dup", ["--manifest", f"{curated}/manifest.parquet", "--upstream", f"{curated}/watermark.parquet", "--out", f"{curated}/near_dup.parquet", "--store", "store/near_dup"]),
        ("caption", ["--manifest", f"{curated}/manifest.parquet", "--filter", f"{curated}/watermark.parquet", "--filter", f"{curated}/near_dup.parquet", "--out", f"{curated}/dataset.parquet", "--store", "store/caption"]),
        ("cache", ["--resolution", str(CACHE_PX), "--dataset", f"{curated}/dataset.parquet", "--out", f"cache/{CACHE_PX}"]),
    ]
    crashes, failures = 0, []
    print(f"{len(good)} good + {sum(map(len, corpus.values()))} malformed files in {len(domains)} domains; stages:")
    for name, stage_args in stages:
        crashed, seconds, tail = run_stage(name, stage_args, work)
        print(f"  {name:<10} {'CRASHED' if crashed else 'ok':<8} {seconds:6.1f} s")
        if crashed:
            crashes += 1
            failures.append(f"{name} crashed:\n{tail}")
            break

    manifest = pd.read_parquet(work / curated / "manifest.parquet") if not crashes else pd.DataFrame(columns=["path", "status", "reason", "sha256"])
    dataset = pd.read_parquet(work / curated / "dataset.parquet") if not crashes else pd.DataFrame(columns=["path"])
    status, reason = dict(zip(manifest["path"], manifest["status"])), dict(zip(manifest["path"], manifest["reason"]))
    in_dataset = set(dataset["path"])

    # One row per file, each decided with a reason when rejected.
    on_disk = len(before)
    if len(manifest) != on_disk:
        failures.append(f"manifest has {len(manifest)} rows for {on_disk} files")
    if not manifest["status"].isin(["kept", "rejected"]).all():
        failures.append("a manifest row is neither kept nor rejected")
    unexplained = manifest[(manifest["status"] == "rejected") & (manifest["reason"].fillna("").str.len() == 0)]
    if len(unexplained):
        failures.append(f"{len(unexplained)} rejected without a reason, e.g. {unexplained['path'].iloc[0]}")

    print(f"\n{'kind':<22}{'files':>6}{'expect':>9}{'kept':>6}{'rej':>5}{'dataset':>9}{'wrong':>7}  reasons")
    wrong_total = 0
    for kind, paths in [*corpus.items(), ("good", good)]:
        keys = [manifest_key(p) for p in paths]
        want = "kept" if kind == "good" else expected_for(kind)
        got = [status.get(k, "missing") for k in keys]
        wrong = sum(g == "missing" or (want != "either" and g != want) for g in got)
        if kind == "good":
            wrong += sum(k not in in_dataset for k in keys)  # a good image must reach the dataset
        wrong_total += wrong
        reasons = Counter(reason[k].split(":")[0] for k in keys if status.get(k) == "rejected")
        common = ", ".join(f"{why} x{count}" for why, count in reasons.most_common(2))
        print(f"{kind:<22}{len(paths):>6}{want:>9}{got.count('kept'):>6}{got.count('rejected'):>5}{sum(k in in_dataset for k in keys):>9}{wrong:>7}  {common}")
    if wrong_total:
        failures.append(f"{wrong_total} files decided against expectation")

    # The cache: every dataset image, mirrored, exactly once, in shards that read back whole.
    cache_rows = corrupted = 0
    keys: Counter = Counter()
    for shard in sorted((work / "cache" / str(CACHE_PX)).glob("*.parquet")):
        try:
            table = pq.read_table(shard, columns=["sha256", "flipped"])
        except Exception as error:  # noqa: BLE001 - any unreadable shard is the finding
            corrupted += 1
            failures.append(f"unreadable shard {shard.name}: {error}")
            continue
        cache_rows += table.num_rows
        keys.update(zip(table.column("sha256").to_pylist(), table.column("flipped").to_pylist()))
    duplicated = sum(count - 1 for count in keys.values() if count > 1)
    want_keys = {(sha, flip) for sha in dataset["sha256"] for flip in ((False, True) if params["cache"].get("flip", True) else (False,))} if not crashes else set()
    if set(keys) != want_keys or duplicated:
        failures.append(f"cache holds {len(keys)} keys ({duplicated} duplicated) for {len(want_keys)} wanted")

    after = snapshot(list(domains.values()))
    touched = sorted(set(before) ^ set(after) | {p for p in before.keys() & after.keys() if before[p] != after[p]})
    if touched:
        failures.append(f"{len(touched)} entries in the input folders changed, e.g. {touched[0]!r}")

    print(f"\nfiles {on_disk}  manifest rows {len(manifest)}  kept {int((manifest['status'] == 'kept').sum())}  "
          f"rejected {int((manifest['status'] == 'rejected').sum())}  dataset {len(dataset)}  cache rows {cache_rows} ({duplicated} duplicated, {corrupted} unreadable shards)")
    print(f"crashes {crashes}  wrong decisions {wrong_total}  input entries changed {len(touched)}  wall {time.perf_counter() - started:.0f} s")
    for failure in failures:
        print(f"FAIL: {failure}")
    if args.keep:
        print(f"work folder: {work}")
    else:
        for folder in domains.values():  # make_corpus made one file unreadable; make it removable again
            for entry in os.scandir(os.fsencode(folder)):
                if not entry.is_symlink():
                    os.chmod(entry.path, 0o644)
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
