"""Freeze by module-name pattern.

A pattern matches a parameter when it matches the full name or any dotted prefix of it, with shell
wildcards: ``encoder`` freezes ``encoder.*``; ``inter*`` freezes ``inter``, ``inter_a``, ``inter_b``;
``decoder_?.outputs.*`` freezes every decoder's output blocks. ``old`` is special: every tensor that
existed before the model's latest growth (see ``Autoencoder.old_names``), so ``freeze: [old]`` in the
stage that grows trains only the new level.

Frozen parameters get ``requires_grad=False`` and are never handed to the optimizer, so they receive no
gradient, no update, no weight decay and no optimizer state: they are bit-identical after the stage.
``resolve`` does it once per stage; its ``Trainable`` (names and parameters, in model order) is what the
optimizer, the gradient clipping and the backups' optimizer-state names all use.
"""

from __future__ import annotations

from dataclasses import dataclass
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


class FreezeError(ValueError):
    """The patterns cannot be applied to this model (the message names the pattern)."""


@dataclass(frozen=True)
class Trainable:
    """What a stage's freeze patterns leave to train, resolved once: the optimizer's parameters in model order."""

    names: list[str]
    params: list[nn.Parameter]
    frozen: frozenset[str]


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


def resolve(model: nn.Module, patterns: list[str], old: set[str]) -> Trainable:
    """Freeze what ``patterns`` match (``requires_grad=False``) and return what is left to train. Raises
    ``FreezeError`` for a pattern that matches nothing, or patterns that would freeze everything."""
    frozen, unmatched = frozen_names(model, patterns, old)
    for pattern in unmatched:
        hint = "the model has not grown yet (it is at the init resolution)" if pattern == OLD else "parameter names look like encoder.blocks.16.conv1.weight, inter.dense1.weight, decoder_a.outputs.16.conv.bias"
        raise FreezeError(f"pattern {pattern!r} matches no parameter; {hint}")
    if len(frozen) == len(list(model.parameters())):
        raise FreezeError("the patterns freeze every parameter: nothing would train")
    names, params = [], []
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)
        if name not in frozen:
            names.append(name)
            params.append(param)
    return Trainable(names, params, frozenset(frozen))
