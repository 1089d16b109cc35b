"""Freeze by module-name pattern.

A pattern matches a parameter when it matches the full name or any dotted prefix of it, with shell
wildcards: ``encoder`` freezes ``encoder.*``; ``inter*`` freezes ``inter``, ``inter_a``, ``inter_b``;
``decoder_?.outputs.*`` freezes every decoder's output blocks. ``old`` is special: every tensor that
existed before the model's latest growth (see ``Autoencoder.old_names``), so ``freeze: [old]`` in the
stage that grows trains only the new level.

Frozen parameters get ``requires_grad=False`` and are never handed to the optimizer, so they receive no
gradient, no update, no weight decay and no optimizer state: they are bit-identical after the stage.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

OLD = "old"


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def matches(pattern: str, name: str, old: set[str]) -> bool:
    if pattern == OLD:
        return name in old
    return any(fnmatchcase(prefix, pattern) for prefix in _prefixes(name))


def frozen_names(model: nn.Module, patterns: list[str], old: set[str]) -> tuple[set[str], list[str]]:
    """(names of the parameters the patterns freeze, the patterns that match nothing)."""
    names = [n for n, _ in model.named_parameters()]
    frozen: set[str] = set()
    unmatched = []
    for pattern in patterns:
        hit = {n for n in names if matches(pattern, n, old)}
        if not hit:
            unmatched.append(pattern)
        frozen |= hit
    return frozen, unmatched


def apply_freeze(model: nn.Module, frozen: set[str]) -> list[nn.Parameter]:
    """Set requires_grad per ``frozen``; return the trainable parameters (the optimizer's, in model order)."""
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)
        if name not in frozen:
            trainable.append(param)
    return trainable
