"""Profiles: named sets of params (``profiles/<name>.yaml``) merged into ``params.yaml``.

    make profile PROFILE=liae-256        # = python -m stagewise.profiles liae-256

A profile holds what it changes, in params.yaml's own layout. Mappings merge key by key (the profile
wins), except three that are taken whole, so that no key of the previous profile survives in them:
``model`` (an architecture is described completely), ``train.defaults`` and ``train.stages`` (a recipe
is an ordered list of stages; a merged one would keep stages the profile does not have). ``params.yaml`` is
rewritten with ruamel.yaml's round trip (DVC's own YAML library), so its comments and key order stay,
the profile's comments come with its values, and ``git diff params.yaml`` shows exactly what changed;
``git checkout params.yaml`` undoes it. The merged file is validated (every section's config) before
it is written: a bad profile loses nothing.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from stagewise.config import ParamsError, SECTIONS

PROFILES_DIR = Path("profiles")
REPLACED = {("model",), ("train", "defaults"), ("train", "stages")}  # taken whole: see the module docstring


def _yaml() -> YAML:
    yaml = YAML()  # round-trip: comments, order and quoting survive
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096  # never re-wrap a long comment or value
    # params.yaml spells None `null` (ruamel's round trip would write nothing)
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return yaml


def available(folder: Path = PROFILES_DIR) -> list[str]:
    return sorted(p.stem for p in Path(folder).glob("*.yaml"))


def load_profile(name_or_path: str, folder: Path = PROFILES_DIR) -> tuple[Path, CommentedMap]:
    path = Path(name_or_path) if name_or_path.endswith((".yaml", ".yml")) else Path(folder) / f"{name_or_path}.yaml"
    if not path.exists():
        raise ParamsError(f"{path}: no such profile; available: {', '.join(available(folder)) or 'none'} (in {folder}/)")
    data = _yaml().load(path.read_text())
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: a profile is a mapping of params.yaml sections")
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        raise ParamsError(f"{path}: {unknown[0]}: not a params.yaml section; allowed: {', '.join(SECTIONS)}")
    return path, data


def merge(base: CommentedMap, profile: dict, where: tuple[str, ...] = ()) -> None:
    """Merge ``profile`` into ``base`` in place (see the module docstring)."""
    for key, value in profile.items():
        here = (*where, key)
        if isinstance(value, dict) and isinstance(base.get(key), dict) and here not in REPLACED:
            merge(base[key], value, here)
        else:
            base[key] = value


def _validate(params: dict[str, Any], source: str) -> None:
    """Every section the profile can touch, through the configs the stages use (exit 2, nothing written)."""
    from stagewise.cache import CacheConfig
    from stagewise.codecs import CodecConfig
    from stagewise.config import parse_section
    from stagewise.models import ModelConfig
    from stagewise.train.recipe import parse_train

    plain = _plain(params)
    for section, cls in (("model", ModelConfig), ("codec", CodecConfig), ("cache", CacheConfig)):
        parse_section(plain.get(section) or {}, cls, section, source)
    train = parse_train(plain.get("train"), source)
    missing = sorted({s.resolution_px for s in train.stages.values()} - set(plain.get("cache", {}).get("resolutions", CacheConfig().resolutions)))
    if missing:
        raise ParamsError(f"{source}: cache.resolutions: the recipe trains at {missing} px, which the cache does not encode")


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def apply_profile(name_or_path: str, params_path: Path | str = "params.yaml", folder: Path = PROFILES_DIR) -> Path:
    """Merge the profile into ``params_path`` (validated first); returns the profile's path."""
    params_path = Path(params_path)
    profile_path, profile = load_profile(name_or_path, folder)
    yaml = _yaml()
    base = yaml.load(params_path.read_text())
    merge(base, profile)
    _validate(base, f"{params_path} + {profile_path}")
    out = io.StringIO()
    yaml.dump(base, out)
    params_path.write_text(out.getvalue())
    return profile_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", help=f"a name in {PROFILES_DIR}/ (without .yaml) or a path to a profile file")
    parser.add_argument("--params", default="params.yaml", help="params file to merge into (default: %(default)s)")
    parser.add_argument("--profiles", type=Path, default=PROFILES_DIR, help="folder of profiles (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        path = apply_profile(args.profile, args.params, args.profiles)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"merged {path} into {args.params}; `git diff {args.params}` shows the changes, `git checkout {args.params}` undoes them")


if __name__ == "__main__":
    main()
