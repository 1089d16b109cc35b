import pytest
from pydantic import Field

from stagewise.config import ParamsError, Section, fingerprint, load_section


class Inner(Section):
    lr: float = Field(1e-3, gt=0)


class Outer(Section):
    name: str = "x"
    stages: dict[str, Inner] = {}


def write(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_defaults_when_section_missing(tmp_path):
    cfg = load_section("outer", Outer, write(tmp_path, "other: {}\n"))
    assert cfg == Outer()


def test_unknown_key_is_named_with_allowed_keys(tmp_path):
    path = write(tmp_path, "outer:\n  nmae: y\n")
    with pytest.raises(ParamsError, match=r"outer\.nmae: unknown key; allowed keys: name, stages"):
        load_section("outer", Outer, path)


def test_nested_error_names_full_key_path(tmp_path):
    path = write(tmp_path, "outer:\n  stages:\n    lrd:\n      lr: -1\n")
    with pytest.raises(ParamsError, match=r"outer\.stages\.lrd\.lr: Input should be greater than 0 \(got -1\)"):
        load_section("outer", Outer, path)


def test_unknown_key_inside_user_named_entry(tmp_path):
    path = write(tmp_path, "outer:\n  stages:\n    lrd:\n      learning_rate: 1\n")
    with pytest.raises(ParamsError, match=r"outer\.stages\.lrd\.learning_rate: unknown key; allowed keys: lr"):
        load_section("outer", Outer, path)


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_section("outer", Outer, write(tmp_path, "outer: [\n"))
    with pytest.raises(ParamsError, match="not found"):
        load_section("outer", Outer, tmp_path / "nope.yaml")


def test_fingerprint_is_stable_and_sensitive():
    assert fingerprint(Inner(lr=0.1), "a") == fingerprint(Inner(lr=0.1), "a")
    assert fingerprint(Inner(lr=0.1)) != fingerprint(Inner(lr=0.2))
