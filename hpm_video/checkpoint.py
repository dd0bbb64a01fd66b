"""Weights files: safe loading, atomic saving, and the self-describing model file.

Files from others are data, never code: ``.pth``/``.pt``/``.bin`` load with
``torch.load(weights_only=True)``, ``.safetensors`` with safetensors. Saving goes through a
temporary file in the same folder and ``os.replace`` so a crash never leaves a half-written file.

A *model file* (``save_model_file``) holds ``{"model": state_dict, "model_name": str,
"model_kwargs": dict}`` so tools can rebuild the model without a config.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

WRAPPER_KEYS = ("model", "module", "state_dict", "model_state")
STRIP_PREFIXES = ("_orig_mod.", "module.")


def save_atomic(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; weights are for the team to read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_file(path: str) -> dict[str, Any]:
    """Load a weights file as data (``weights_only=True`` or safetensors), naming the file on error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file as load_safetensors

        return load_safetensors(path, device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors name neither the file nor the cause clearly
        raise ValueError(f"cannot load {path} as weights (weights_only=True): {err}") from err
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a dict of tensors")
    return dict(obj)


def unwrap_state_dict(obj: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint (under ``model``/``module``/... if wrapped), prefixes stripped."""
    for key in WRAPPER_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    out = {}
    for name, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        # Wrappers nest in either order: DDP(compile(m)) saves "module._orig_mod.", compile(DDP(m)) the reverse.
        while name.startswith(STRIP_PREFIXES):
            for prefix in STRIP_PREFIXES:
                name = name.removeprefix(prefix)
        out[name] = value
    return out


def key_prefixes(keys: list[str] | Mapping[str, Any], depth: int = 1, limit: int = 12) -> list[str]:
    """The distinct leading dotted components of ``keys``, for error messages about unknown layouts."""
    seen: list[str] = []
    for key in keys:
        prefix = ".".join(key.split(".")[:depth])
        if prefix not in seen:
            seen.append(prefix)
    return seen[:limit]


def jsonable(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Model kwargs as JSON values (tuples become lists), for metadata and checkpoint client state."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


def save_model_file(path: str, model: nn.Module | Mapping[str, torch.Tensor], model_name: str, **model_kwargs) -> None:
    """Write a self-describing model file that ``load_model_file`` rebuilds without a config."""
    state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_atomic({"model": state, "model_name": model_name, "model_kwargs": dict(model_kwargs)}, path)


def load_model_file(path: str, strict: bool = True, **overrides) -> nn.Module:
    """Rebuild and load a model written by ``save_model_file``."""
    from hpm_video.models import create_model

    obj = load_file(path)
    if "model_name" not in obj:
        raise ValueError(
            f"{path} is not an hpm-video model file (no 'model_name'); top-level keys: {key_prefixes(list(obj))}"
        )
    kwargs = dict(obj.get("model_kwargs", {}))
    kwargs.update(overrides)
    model = create_model(obj["model_name"], **kwargs)
    state = unwrap_state_dict(obj)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise ValueError(f"{path}: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
    if getattr(model, "teacher", None) is not None and not any(k.startswith("teacher.") for k in state):
        model.reset_teacher()
    return model
