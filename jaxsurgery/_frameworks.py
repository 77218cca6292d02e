"""What jaxsurgery knows about neural-network libraries beyond their name scopes.

Flax linen, Haiku and Equinox name their values through ``jax.named_scope``
(:mod:`jaxsurgery._scopes`). Flax NNX modules push no scope, so a call of an NNX
submodule is named by its attribute path in the calling module: in
``for layer in self.layers: x = layer(x)`` the calls are ``layers[0]``, ``layers[1]``...
rather than ``layer#0``, ``layer#1``.
"""

from __future__ import annotations

import sys
from typing import Any


def _nnx() -> Any:
    return sys.modules.get("flax.nnx")  # never import a framework the user did not


def submodule_paths(parent: Any) -> dict[int, str] | None:
    """``id(submodule) -> "layers[2]"`` for an NNX module, or None for anything else."""
    nnx = _nnx()
    parent = getattr(parent, "__self__", parent)  # a bound method: its module
    if nnx is None or not isinstance(parent, nnx.Module):
        return None
    paths: dict[int, str] = {}
    for path, node in nnx.iter_graph(parent):
        if path and isinstance(node, nnx.Module) and id(node) not in paths:
            paths[id(node)] = format_path(path)
    return paths


def format_path(path: tuple[Any, ...]) -> str:
    """``("blocks", 0, "attn") -> "blocks[0].attn"``."""
    text = ""
    for key in path:
        if isinstance(key, int):
            text += f"[{key}]"
        else:
            text += f".{key}" if text else str(key)
    return text
