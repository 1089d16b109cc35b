"""reports/summary.md: what curation kept and why it dropped the rest, and one row per training stage.

Reads whatever exists: ``manifest.parquet`` (ingest), every other per-image Parquet in the curated
folder that has a ``status`` column (a filter: watermark, vlm_filter, ...), ``dataset.parquet`` (the
final set), the latent cache's index per resolution, and each ``runs/<stage>/`` (meta.json, metrics.json).
Training stages are listed parent before child, following the ``parent`` recorded in each meta.json.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from stagewise.config import Section
from stagewise.latents import read_index

MANIFEST, DATASET = "manifest.parquet", "dataset.parquet"


class ReportConfig(Section):
    title: str = "stagewise run"


def reason_kind(reason: Any) -> str:
    """``"too small: 40x40 px < 64"`` -> ``"too small"``: reasons grouped by their kind."""
    return str(reason).split(":", 1)[0].strip() if isinstance(reason, str) and reason else "unspecified"


def decision_tables(curated: Path) -> Iterator[tuple[str, pd.DataFrame]]:
    """(step name, table) of every curation step's per-image decisions (a ``status`` column), manifest first."""
    files = [curated / MANIFEST] + sorted(p for p in curated.glob("*.parquet") if p.name not in (MANIFEST, DATASET))
    for path in files:
        if not path.exists():
            continue
        frame = pd.read_parquet(path, columns=None)
        if "status" in frame.columns:
            yield path.stem, frame


def rejection_reasons(curated: Path, domain: str) -> dict[str, dict[str, int]]:
    """Step -> reason kind -> images of ``domain`` that step rejected: why a domain ended up empty."""
    out, domain_of = {}, {}
    for step, frame in decision_tables(curated):
        if "domain" in frame.columns:
            domain_of.update(zip(frame["path"], frame["domain"]))  # the manifest comes first and has every path
        rejected = frame[(frame["status"] != "kept") & (frame["path"].map(domain_of) == domain)]
        if len(rejected):
            out[step] = {k: int(v) for k, v in rejected["reason"].map(reason_kind).value_counts().sort_index().items()}
    return out


def curation(curated: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"steps": []}
    for step, frame in decision_tables(curated):
        rejected = frame[frame["status"] != "kept"]
        out["steps"].append(
            {
                "step": step,
                "input": len(frame),
                "kept": int((frame["status"] == "kept").sum()),
                "rejected": len(rejected),
                "reasons": {k: int(v) for k, v in rejected["reason"].map(reason_kind).value_counts().sort_index().items()},
                "by_domain": {str(d): int(n) for d, n in frame[frame["status"] == "kept"].groupby("domain").size().items()},
            }
        )
    dataset = curated / DATASET
    if dataset.exists():
        frame = pd.read_parquet(dataset, columns=["domain"])
        out["dataset"] = {str(d): int(n) for d, n in frame.groupby("domain").size().items()}
    return out


def cache_rows(cache: Path) -> dict[str, dict[str, int]]:
    out = {}
    for folder in sorted((p for p in cache.glob("*") if p.is_dir()), key=lambda p: (len(p.name), p.name)):
        index = read_index(folder)
        if len(index):
            out[folder.name] = {"rows": len(index), "images": int(index["sha256"].nunique()), "flipped_rows": int(index["flipped"].sum())}
    return out


def training(runs: Path) -> list[dict[str, Any]]:
    stages = {}
    for meta_path in runs.glob("*/meta.json"):
        meta = json.loads(meta_path.read_text())
        metrics_path = meta_path.with_name("metrics.json")
        stages[meta_path.parent.name] = (meta, json.loads(metrics_path.read_text()) if metrics_path.exists() else {})
    ordered, seen = [], set()

    def visit(name: str) -> None:  # parent first, then children in name order
        for child in sorted(n for n, (m, _) in stages.items() if m.get("parent") == name and n not in seen):
            seen.add(child)
            ordered.append(child)
            visit(child)

    visit("init")
    ordered += sorted(set(stages) - seen - {"init"})  # orphans (parent missing): still reported
    rows = []
    for name in ordered:
        meta, metrics = stages[name]
        row = {"stage": name, "parent": meta.get("parent"), "resolution_px": meta.get("resolution_px"), "kimg": meta.get("images_seen", 0) / 1000, "wall_s": meta.get("wall_s"), "rollbacks": meta.get("rollbacks", 0)}
        for d in ("a", "b"):
            scores = metrics.get(d, {})
            row[f"loss_{d}"] = metrics.get("train", {}).get(f"loss_{d}")
            row[f"psnr_{d}_db"] = scores.get("psnr_db")
            row[f"ssim_{d}"] = scores.get("ssim")
        rows.append(row)
    return rows


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def render(cfg: ReportConfig, cur: dict[str, Any], cache: dict[str, dict[str, int]], rows: list[dict[str, Any]]) -> str:
    lines = [f"# {cfg.title}", "", "## Curation", ""]
    if cur["steps"]:
        lines += ["| step | in | kept | rejected | reasons |", "|---|---:|---:|---:|---|"]
        for s in cur["steps"]:
            reasons = ", ".join(f"{k}: {v}" for k, v in s["reasons"].items()) or "–"
            lines.append(f"| {s['step']} | {s['input']} | {s['kept']} | {s['rejected']} | {reasons} |")
    else:
        lines.append("No curation results yet.")
    if "dataset" in cur:
        lines += ["", "Dataset: " + ", ".join(f"{d}: {n} images" for d, n in cur["dataset"].items()) + "."]
    if cache:
        lines += ["", "Latent cache: " + "; ".join(f"{res} px: {c['rows']} rows ({c['images']} images, {c['flipped_rows']} mirrored)" for res, c in cache.items()) + "."]
    lines += ["", "## Training", ""]
    if rows:
        lines += [
            "| stage | parent | px | kimg | time (s) | loss A | loss B | PSNR A (dB) | PSNR B (dB) | SSIM A | SSIM B | rollbacks |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r['stage']} | {r['parent']} | {r['resolution_px']} | {_fmt(r['kimg'])} | {_fmt(r['wall_s'], 0)} | {_fmt(r['loss_a'], 4)} | {_fmt(r['loss_b'], 4)} "
                f"| {_fmt(r['psnr_a_db'])} | {_fmt(r['psnr_b_db'])} | {_fmt(r['ssim_a'], 3)} | {_fmt(r['ssim_b'], 3)} | {r['rollbacks']} |"
            )
        lines += ["", "Loss: the stage's training loss (latent space, last status interval). PSNR / SSIM: held-out images, model reconstruction vs. the codec's decode of the same latent, in pixels."]
    else:
        lines.append("No training stage has finished yet.")
    return "\n".join(lines) + "\n"


def build_report(cfg: ReportConfig, curated: Path, cache: Path, runs: Path) -> tuple[str, dict[str, Any]]:
    cur = curation(curated)
    cached = cache_rows(cache) if cache.exists() else {}
    rows = training(runs) if runs.exists() else []
    # Mappings all the way down (no lists), so `dvc metrics show / diff` can flatten every figure to a key.
    curation_metrics = {s["step"]: {k: v for k, v in s.items() if k != "step"} for s in cur["steps"]}
    if "dataset" in cur:
        curation_metrics["dataset"] = cur["dataset"]
    metrics = {"curation": curation_metrics, "cache": cached, "stages": {r["stage"]: {k: v for k, v in r.items() if k != "stage"} for r in rows}}
    return render(cfg, cur, cached, rows), metrics
