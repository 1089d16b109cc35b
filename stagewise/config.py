"""Typed, strict configuration: one pydantic model per stage, read from its own params.yaml section.

Unknown keys are rejected and every error names the full key path, e.g.
``params.yaml: train.stages.lrd.lr: Input should be greater than 0 (got -0.001)``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(ValueError):
    """A params.yaml problem; the message names the file, the key and what is allowed."""


class Section(BaseModel):
    """Base for every stage config: immutable, unknown keys forbidden."""

    model_config = ConfigDict(extra="forbid", frozen=True)


T = TypeVar("T", bound=BaseModel)


def read_params(path: Path | str = DEFAULT_PARAMS) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found (run from the project root, where params.yaml lives)") from None
    try:
        params = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of stage sections")
    return params


# The top-level sections of params.yaml: one per pipeline stage (or shared setting; `data` holds the
# user's input folders, stagewise.domains.DataConfig). A key outside this
# list is a misspelling (``trian:``) that would otherwise be silently ignored while the stage ran on its
# defaults; every stage entry point rejects it (``check_sections``, called by ``stagewise.cli.run``).
SECTIONS = ("data", "sample", "ingest", "align", "watermark", "watermark_head", "near_dup", "vlm_filter", "caption", "codec", "cache", "model", "train", "diffusion", "swap", "report", "cluster")


def check_sections(path: Path | str = DEFAULT_PARAMS, sections: tuple[str, ...] = SECTIONS) -> None:
    """Reject top-level keys of ``path`` that are not ``sections``, naming the key, its line and the allowed ones."""
    params = read_params(path)
    unknown = [key for key in params if key not in sections]
    if not unknown:
        return
    lines: dict[str, int] = {}
    node = yaml.compose(Path(path).read_text())
    if isinstance(node, yaml.MappingNode):
        lines = {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
    raise ParamsError(
        "\n".join(
            f"{path}: {key}: unknown section (line {lines.get(str(key), '?')}){_did_you_mean(str(key), sections)}; allowed sections: {', '.join(sections)}"
            for key in unknown
        )
    )


def _did_you_mean(key: str, choices: tuple[str, ...]) -> str:
    import difflib

    close = difflib.get_close_matches(key, choices, n=1)
    return f", did you mean {close[0]}?" if close else ""


def parse_section(raw: Any, model: type[T], section: str, source: str = "params.yaml") -> T:
    """Validate ``raw`` as ``model``; errors are re-raised as ParamsError naming ``section.key``."""
    try:
        return model.model_validate(raw if raw is not None else {})
    except ValidationError as exc:
        raise ParamsError(format_validation_error(exc, model, section, source)) from None


def load_section(section: str, model: type[T], path: Path | str = DEFAULT_PARAMS) -> T:
    """Read ``section`` (a dotted path such as ``train``) of params.yaml as ``model``."""
    node: Any = read_params(path)
    for part in section.split("."):
        if not isinstance(node, dict) or part not in node:
            node = None
            break
        node = node[part]
    return parse_section(node, model, section, str(path))


def format_validation_error(exc: ValidationError, model: type[BaseModel], section: str, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join([section, *(str(p) for p in err["loc"])])
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, err["loc"][:-1])
            hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
            lines.append(f"{source}: {key}: unknown key{hint}")
        else:
            lines.append(f"{source}: {key}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the sub-model at ``loc`` (best effort: dict keys in the path are skipped)."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            break
        field = current.model_fields.get(str(part))
        if field is None:
            continue  # a user-chosen dict key such as a training stage's name
        current = _inner_model(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return []


def _inner_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def fingerprint(*parts: Any) -> str:
    """A short, stable hash of settings: keys per-image results so a change recomputes only what it affects."""
    def canon(x: Any) -> Any:
        if isinstance(x, BaseModel):
            return x.model_dump(mode="json")
        return x

    blob = json.dumps([canon(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
