"""Fetch clean held-out photos and wallpapers from Debian packages for benchmarks/watermark_eval.py.

Runs `apt-get download` (no root, nothing installed) for the packages below, unpacks each with
`dpkg -x` into a scratch folder, keeps one image per wallpaper (the largest of its resolutions), and
writes it as a JPEG (longer side at most --max-side px) into OUT/<package>/<name>.jpg, with the
package's copyright file beside it (OUT/<package>/copyright) and OUT/sources.tsv listing every image,
its package and the file it came from. Nothing here is committed (OUT is git-ignored), and the
evaluation reads OUT offline once it exists.

Licences (from each package's copyright file, checked when this list was made): GPL-2+ (plasma,
mate, desktop-base), CC-BY-SA-3.0/4.0, CC-BY-4.0 and CC0 (lomiri, ukui), CC-BY-SA (gnome),
GPL (propaganda-debian). All allow this use (evaluation, not redistribution); see each copyright file for the
per-image authors.

    python benchmarks/fetch_eval_photos.py --out data/eval_photos     # what `make eval-photos` runs
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

PACKAGES = (
    "plasma-workspace-wallpapers", "gnome-backgrounds", "mate-backgrounds", "ukui-wallpapers", "lomiri-wallpapers",
    "lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04", "desktop-base", "propaganda-debian",
)  # not debian-edu-artwork-* nor sway-backgrounds: every background there carries the distribution's or
#    the window manager's logo and name (a real mark: not clean)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
# Not photos or backgrounds: previews, icons, logos, login-screen decorations (they are often text or logos).
SKIP = re.compile(r"(preview|screenshot|thumb|icon|logo|emblem|grub|plymouth|lockscreen|login|splash|symbolic|/look-and-feel/"
                  r"|Float-into-MATE|focal-ubuntukylin)", re.I)  # the last two: a distribution's logo or name drawn on them
MIN_STD_GREY = 6.0  # flatter ones are transparent overlays (white or black once flattened), not backgrounds
RESOLUTION = re.compile(r"[_-]?\d{3,5}x\d{3,5}")
MIN_SIDE_PX = 400  # smaller ones are icons or tiles


def wallpaper_key(path: Path, root: Path) -> str:
    """One key per wallpaper whatever its resolution: KDE's <Name>/contents/images/<WxH>.jpg -> Name;
    Elephants_3840x2160.jpg -> Elephants."""
    rel = path.relative_to(root)
    parts = rel.parts
    if "contents" in parts:
        return parts[parts.index("contents") - 1]
    return RESOLUTION.sub("", path.stem)


def extract(package: str, scratch: Path) -> Path | None:
    subprocess.run(["apt-get", "download", package], cwd=scratch, check=True, stdout=subprocess.DEVNULL)
    debs = sorted(scratch.glob(f"{package}_*.deb"))
    if not debs:
        return None
    root = scratch / f"x-{package}"
    subprocess.run(["dpkg", "-x", str(debs[0]), str(root)], check=True)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to fill (created; existing images are kept)")
    parser.add_argument("--max-side", type=int, default=1024, help="longer side of the written JPEGs, px")
    parser.add_argument("--packages", nargs="*", default=list(PACKAGES), help="Debian packages to take images from")
    args = parser.parse_args()
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        sys.exit("error: needs apt-get and dpkg (a Debian or Ubuntu machine that reaches its package registry)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for package in args.packages:
            try:
                root = extract(package, Path(tmp))
            except subprocess.CalledProcessError as exc:
                print(f"skipped {package}: {exc}", file=sys.stderr)
                continue
            if root is None:
                continue
            best: dict[str, tuple[int, Path]] = {}
            for path in root.rglob("*"):
                if path.suffix.lower() not in IMAGE_SUFFIXES or SKIP.search(str(path.relative_to(root))):
                    continue
                try:
                    with Image.open(path) as img:
                        w, h = img.size
                except OSError:
                    continue
                if min(w, h) < MIN_SIDE_PX:
                    continue
                key = wallpaper_key(path, root)
                if key in best and w * h <= best[key][0]:
                    continue
                try:
                    with Image.open(path) as img:
                        img.thumbnail((256, 256))
                        flat = float(np.asarray(img.convert("L"), dtype=np.float32).std()) < MIN_STD_GREY
                except OSError:
                    continue
                if not flat:
                    best[key] = (w * h, path)
            dest = out / package
            dest.mkdir(exist_ok=True)
            for key, (_, path) in sorted(best.items()):
                name = re.sub(r"[^A-Za-z0-9_.-]+", "_", key)
                target = dest / f"{name}.jpg"
                if not target.exists():
                    with Image.open(path) as img:
                        img = img.convert("RGB")
                        img.thumbnail((args.max_side, args.max_side), Image.LANCZOS)
                        img.save(target, quality=95)
                rows.append(f"{package}/{target.name}\t{package}\t{path.relative_to(root)}")
            for copyright in root.glob("usr/share/doc/*/copyright"):
                shutil.copyfile(copyright, dest / "copyright")
            print(f"{package}: {len(best)} images", file=sys.stderr)
    (out / "sources.tsv").write_text("image\tpackage\tfile\n" + "\n".join(rows) + "\n")
    print(f"{len(rows)} images in {out}")


if __name__ == "__main__":
    main()
