"""reports/summary.md: what curation kept and why it dropped the rest, and one row per training stage.

Reads whatever exists: ``manifest.parquet`` (ingest), every other per-image Parquet in the curated
folder that has a ``status`` column (a filter: watermark, vlm_filter, ...), ``dataset.parquet`` (the
final set), the latent cache's index per resolution, each autoencoder stage ``runs/<stage>/`` (meta.json,
metrics.json) and each diffusion phase ``runs/<phase>/`` (unet.json with its ``phase``, metrics.json).
Stages and phases are listed parent before child, following the ``parent`` each one records.
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


def _finished(runs: Path, meta_name: str, is_family: Any) -> dict[str, tuple[dict, dict]]:
    """Folder name -> (meta, metrics) of every finished run of one family (its meta file passes ``is_family``)."""
    out = {}
    for meta_path in runs.glob(f"*/{meta_name}"):
        meta = json.loads(meta_path.read_text())
        if is_family(meta):
            metrics_path = meta_path.with_name("metrics.json")
            out[meta_path.parent.name] = (meta, json.loads(metrics_path.read_text()) if metrics_path.exists() else {})
    return out


def _parent_first(stages: dict[str, tuple[dict, dict]]) -> list[str]:
    ordered, seen = [], set()

    def visit(name: str) -> None:  # parent first, then children in name order
        for child in sorted(n for n, (m, _) in stages.items() if m.get("parent") == name and n not in seen):
            seen.add(child)
            ordered.append(child)
            visit(child)

    visit("init")
    return ordered + sorted(set(stages) - seen - {"init"})  # orphans (parent missing): still reported


def training(runs: Path) -> list[dict[str, Any]]:
    stages = _finished(runs, "meta.json", lambda meta: True)
    rows = []
    for name in _parent_first(stages):
        meta, metrics = stages[name]
        row = {"stage": name, "parent": meta.get("parent"), "resolution_px": meta.get("resolution_px"), "kimg": meta.get("images_seen", 0) / 1000, "wall_s": meta.get("wall_s"), "rollbacks": meta.get("rollbacks", 0)}
        for d in ("a", "b"):
            scores = metrics.get(d, {})
            row[f"loss_{d}"] = metrics.get("train", {}).get(f"loss_{d}")
            row[f"psnr_{d}_db"] = scores.get("psnr_db")
            row[f"ssim_{d}"] = scores.get("ssim")
        rows.append(row)
    return rows


def diffusion(runs: Path) -> list[dict[str, Any]]:
    """One row per finished diffusion phase: held-out validation loss overall and per timestep (raw and EMA)."""
    phases = _finished(runs, "unet.json", lambda meta: "phase" in meta)  # diffuse_init's unet.json has no phase
    rows = []
    for name in _parent_first(phases):
        meta, metrics = phases[name]
        row = {"phase": name, "parent": meta.get("parent"), "resolution_px": meta.get("resolution_px"), "kimg": metrics.get("kimg"),
               "wall_s": metrics.get("wall_s"), "rollbacks": metrics.get("rollbacks", 0), "split": metrics.get("split"), "train_loss": metrics.get("train", {}).get("loss")}
        for weights, val in metrics.get("val", {}).items():  # "raw", and "ema" when the phase keeps one
            row.update({f"val_{weights}_{key}": v for key, v in val.items()})
        rows.append(row)
    return rows


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def render_diffusion(phases: list[dict[str, Any]]) -> list[str]:
    timesteps = sorted({int(k[len("val_raw_t"):]) for r in phases for k in r if k.startswith("val_raw_t")})
    lines = ["", "## Diffusion", "", "| phase | parent | px | kimg | time (s) | train loss | val loss | val loss (EMA) | " + " | ".join(f"t={t}" for t in timesteps) + " | rollbacks |",
             "|---|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(timesteps) + "---:|"]
    for r in phases:
        weights = "ema" if "val_ema_loss" in r else "raw"  # per timestep: the weights the phase publishes
        per_t = " | ".join(_fmt(r.get(f"val_{weights}_t{t}"), 4) for t in timesteps)
        lines.append(f"| {r['phase']} | {r['parent']} | {r['resolution_px']} | {_fmt(r['kimg'])} | {_fmt(r['wall_s'], 0)} | {_fmt(r['train_loss'], 4)} "
                     f"| {_fmt(r.get('val_raw_loss'), 4)} | {_fmt(r.get('val_ema_loss'), 4)} | {per_t} | {r['rollbacks']} |")
    lines += ["", "Validation: a fixed grid of rows x timesteps x noise seeds (the same for every phase), MSE of the prediction target; "
              "per-timestep columns use the EMA weights where the phase keeps them. Held-out rows unless the split column of metrics.json says train."]
    return lines


def render(cfg: ReportConfig, cur: dict[str, Any], cache: dict[str, dict[str, int]], rows: list[dict[str, Any]], phases: list[dict[str, Any]] = ()) -> str:
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
    if phases:
        lines += render_diffusion(phases)
    return "\n".join(lines) + "\n"


def build_report(cfg: ReportConfig, curated: Path, cache: Path, runs: Path) -> tuple[str, dict[str, Any]]:
    cur = curation(curated)
    cached = cache_rows(cache) if cache.exists() else {}
    rows = training(runs) if runs.exists() else []
    phases = diffusion(runs) if runs.exists() else []
    # Mappings all the way down (no lists), so `dvc metrics show / diff` can flatten every figure to a key.
    curation_metrics = {s["step"]: {k: v for k, v in s.items() if k != "step"} for s in cur["steps"]}
    if "dataset" in cur:
        curation_metrics["dataset"] = cur["dataset"]
    metrics = {"curation": curation_metrics, "cache": cached, "stages": {r["stage"]: {k: v for k, v in r.items() if k != "stage"} for r in rows},
               "diffusion": {r["phase"]: {k: v for k, v in r.items() if k != "phase"} for r in phases}}
    return render(cfg, cur, cached, rows, phases), metrics
