"""What DVC costs on a large user folder: `dvc status` and a no-op `dvc repro` with data.domains pointing at
folders of N small images outside the project (a copy of this pipeline in a temp git + DVC repo).

Prints, in seconds: the first `dvc repro ingest` (DVC hashes every file once; ingest hashes and decodes
every image), then with nothing changed `dvc status` and a no-op `dvc repro ingest`, then after adding
two images `dvc status` (ingest stale) and `dvc repro ingest` (ingest decodes the two, re-hashing none of
the others: their path, size and mtime match the last manifest). DVC keeps each file's hash in its state
database keyed by inode, size and mtime, so a status after the first one re-reads no file; what remains
is one stat per file. The images are 64 px JPEG crops of scikit-image's astronaut, all distinct, in
subfolders of 1000.

    .venv/bin/python benchmarks/dvc_status_scale.py                  # 20 000 images, 10 000 per domain
    .venv/bin/python benchmarks/dvc_status_scale.py --images 2000
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test helpers that copy the pipeline into a fresh repo


def write_images(root: Path, count: int, seed: int, per_folder: int = 1000) -> None:
    import skimage.data

    photo = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((256, 256), Image.LANCZOS))
    rng = np.random.default_rng(seed)
    for index in range(count):
        y, x = rng.integers(0, 256 - 64, size=2)
        crop = photo[y : y + 64, x : x + 64].copy()
        crop[0, 0] = [index % 256, (index // 256) % 256, seed]  # distinct content, whatever the crop
        folder = root / f"part{index // per_folder:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(crop).save(buf, format="JPEG", quality=90)
        (folder / f"img{index:06d}.jpg").write_bytes(buf.getvalue())


def timed(project: Path, *args: str) -> tuple[float, str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"dvc {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout + proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000, help="images in all, half per domain (default: %(default)s)")
    args = parser.parse_args()
    from conftest import make_project

    with tempfile.TemporaryDirectory(prefix="dvc_status_scale-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        half = args.images // 2
        for seed, domain in enumerate("ab"):
            write_images(work / "photos" / domain, half, seed)
        print(f"wrote {2 * half} images of 64 px in {time.perf_counter() - start:.1f} s")
        domains = {d: str(work / "photos" / d) for d in "ab"}
        project = make_project(work / "project", {"data": {"domains": domains}, "ingest": {"workers": 2}}, sample=False)

        rows = [("first dvc repro ingest (DVC hashes every file; ingest reads all)", timed(project, "repro", "ingest")[0])]
        seconds, out = timed(project, "status", "ingest")
        assert "up to date" in out, out
        rows.append(("dvc status ingest, nothing changed", seconds))
        seconds, out = timed(project, "repro", "ingest")
        assert "Running stage" not in out, out
        rows.append(("dvc repro ingest, nothing changed (no-op)", seconds))
        write_images(work / "photos" / "a" / "new", 2, seed=7)
        seconds, out = timed(project, "status", "ingest")
        assert "modified:" in out, out
        rows.append(("dvc status ingest after adding 2 images (stale)", seconds))
        rows.append(("dvc repro ingest after adding 2 images (decodes 2)", timed(project, "repro", "ingest")[0]))
        rows.append(("dvc status ingest, nothing changed again", timed(project, "status", "ingest")[0]))
        print(f"{2 * half + 2} images in 2 folders outside the project; {os.cpu_count()} CPUs")
        for what, seconds in rows:
            print(f"  {seconds:7.2f} s  {what}")


if __name__ == "__main__":
    main()
