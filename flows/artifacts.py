"""Markdown for the Prefect artifacts of a stage: its metrics, its curation counts, its preview image.

Pure functions from files to markdown strings, so they are tested without a Prefect server, and at
the end `publish_artifacts`, which sends a stage's to Prefect. Nothing here decides anything about
the pipeline; it only reads what the stages wrote.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq
import yaml

if TYPE_CHECKING:
    from flows.dag import StageInfo

# A preview is embedded in the artifact as a data: URI (the Prefect UI renders it inline; a file://
# link would be blocked by the browser on an http:// page). Above this size the artifact would bloat
# the server's database and the run page, so a bigger image is shown as its path instead.
MAX_EMBEDDED_IMAGE_BYTES = 1_500_000
# Wide enough to see every panel of a 6-panel 512 px preview grid at half size; JPEG at this width
# keeps a photo-like preview around 100-300 KB.
PREVIEW_MAX_WIDTH_PX = 1536
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    """{"loss": {"a": 1}} -> {"loss.a": 1}; lists are indexed like DVC does (`key.0`)."""
    if isinstance(values, dict):
        items = values.items()
    elif isinstance(values, list):
        items = enumerate(values)
    else:
        return {prefix: values}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def read_metrics(path: Path) -> dict[str, Any]:
    """A DVC metrics file (JSON or YAML) as a flat {name: value} map."""
    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    return flatten(data or {})


def metrics_markdown(stage: str, files: dict[str, Path]) -> str | None:
    """One table of every metric the stage declared; None when it declared none or they are absent."""
    found = {shown: read_metrics(path) for shown, path in files.items() if path.is_file()}
    if not any(found.values()):
        return None
    if len(found) == 1:
        ((shown, values),) = found.items()
        return f"## `{stage}` metrics\n\n`{shown}`\n\n" + markdown_table(["metric", "value"], [[k, v] for k, v in values.items()])
    rows = [[name, value, shown] for shown, values in found.items() for name, value in values.items()]
    return f"## `{stage}` metrics\n\n" + markdown_table(["metric", "value", "file"], rows)


def _parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path] if path.suffix == ".parquet" else []
    if path.is_dir():  # a shard folder (e.g. data/cache/128): its own files only, not nested stores
        return sorted(p for p in path.iterdir() if p.suffix == ".parquet" and p.is_file())
    return []


def _read_columns(files: list[Path], wanted: list[str]):
    import pandas as pd

    frames = []
    for file in files:
        present = [c for c in wanted if c in pq.read_schema(file).names]
        frames.append(pq.read_table(file, columns=present).to_pandas())
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def curation_markdown(shown: str, path: Path) -> str | None:
    """Counts of a curation output: kept/rejected per domain and rejections grouped by reason.

    Reasons read "kind: detail" (e.g. "too small: 40x40 px < min_side_px 64"); they are grouped by
    kind with one full example, so a thousand "too small" rows make one line. Outputs without a
    status (the captioned dataset, latent shards) get rows per domain instead. None for non-Parquet.
    """
    files = _parquet_files(path)
    if not files:
        return None
    frame = _read_columns(files, ["domain", "status", "reason", "caption_source", "resolution"])
    if "domain" not in frame:
        frame["domain"] = "-"
    parts = [f"## `{shown}`: {len(frame)} rows" + (f" in {len(files)} files" if path.is_dir() else "")]
    if "status" in frame:
        counts = frame.pivot_table(index="domain", columns="status", aggfunc="size", fill_value=0)
        statuses = sorted(counts.columns, key=lambda s: (s != "kept", s))
        parts.append(markdown_table(["domain", *statuses], [[d, *(int(counts.at[d, s]) for s in statuses)] for d in counts.index]))
        dropped = frame[frame["status"] != "kept"]
        if len(dropped):
            reasons = dropped.get("reason", dropped["status"]).fillna("").astype(str)
            kinds = reasons.str.split(":", n=1).str[0]
            rows = []
            for kind, group in reasons.groupby(kinds, sort=False):
                domains = dropped.loc[group.index, "domain"].value_counts()
                rows.append([kind, len(group), ", ".join(f"{d}: {n}" for d, n in domains.items()), group.iloc[0]])
            rows.sort(key=lambda r: -r[1])
            parts.append("Rejected, by reason:\n\n" + markdown_table(["reason", "images", "domains", "example"], rows))
    else:
        by_domain = frame.groupby("domain").size()
        parts.append(markdown_table(["domain", "rows"], [[d, int(n)] for d, n in by_domain.items()]))
        if "caption_source" in frame:
            sources = frame.groupby(["domain", "caption_source"]).size()
            parts.append("Captions by source:\n\n" + markdown_table(["domain", "source", "rows"], [[d, s, int(n)] for (d, s), n in sources.items()]))
    return "\n\n".join(parts)


def image_data_uri(path: Path, max_width_px: int = PREVIEW_MAX_WIDTH_PX) -> str:
    """The image as a data: URI, scaled down to ``max_width_px``; PNG when small, else JPEG."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        if img.width > max_width_px:
            img = img.resize((max_width_px, round(img.height * max_width_px / img.width)), Image.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, "PNG")
        fmt = "png"
        if buf.tell() > 300_000:  # PNG keeps a small grid crisp; a photo-like one is far smaller as JPEG
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=88)
            fmt = "jpeg"
    return f"data:image/{fmt};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def preview_markdown(stage: str, shown: str, path: Path) -> str:
    uri = image_data_uri(path)
    if len(uri) > MAX_EMBEDDED_IMAGE_BYTES:
        return f"## `{stage}` preview\n\nToo large to embed ({len(uri) // 1000} kB): open `{shown}` in the project."
    return f"## `{stage}` preview\n\n`{shown}`\n\n![{stage} preview]({uri})"


# --- publishing a stage's artifacts to Prefect ------------------------------------------------------


def artifact_key(stage: str, kind: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes: "train@s256_locked" -> "train-s256-locked-metrics"."""
    return re.sub(r"[^a-z0-9]+", "-", f"{stage}-{kind}".lower()).strip("-")


def _preview_files(project: Path, stage: StageInfo) -> list[Path]:
    found = []
    for out in stage.outs:
        path = project / out
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            found.append(path)
        elif path.is_dir():  # a run folder: its preview, not every image of a data folder
            found += sorted(p for p in path.glob("preview*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return found


def _metrics_files(project: Path, stage: StageInfo) -> dict[str, Path]:
    files = {m: project / m for m in stage.metrics}
    for out in stage.outs:  # a run folder declared as one output may hold its metrics.json inside
        inside = project / out / "metrics.json"
        if inside.is_file():
            files.setdefault(f"{out}/metrics.json", inside)
    return files


def publish_artifacts(project: str | Path, stage: StageInfo) -> list[str]:
    """Markdown artifacts for a stage's current outputs: metrics, curation counts, preview. Returns their keys."""
    from prefect.artifacts import create_markdown_artifact

    project = Path(project)
    published = []

    def publish(kind: str, markdown: str | None, description: str) -> None:
        if markdown:
            key = artifact_key(stage.name, kind)
            create_markdown_artifact(markdown=markdown, key=key, description=description)
            published.append(key)

    publish("metrics", metrics_markdown(stage.name, _metrics_files(project, stage)), f"{stage.name}: metrics")
    counts = [md for out in stage.outs if (md := curation_markdown(out, project / out))]
    publish("curation", "\n\n".join(counts) if counts else None, f"{stage.name}: rows kept and rejected, with reasons")
    previews = _preview_files(project, stage)
    if previews:
        shown = previews[0].relative_to(project).as_posix()
        publish("preview", preview_markdown(stage.name, shown, previews[0]), f"{stage.name}: {shown}")
    return published
