"""Run directories: model weights in safetensors, configs in JSON, every file written atomically.

A file is written to a temporary name in the same folder, flushed to disk and renamed over the
target, so a crash at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kosmo.errors import KosmoError


def atomic_write(path: str | Path, write) -> Path:
    """Calls write(tmp_path), fsyncs it, then renames it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | Path, obj) -> Path:
    return atomic_write(path, lambda p: Path(p).write_text(json.dumps(obj, indent=2) + "\n"))


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise KosmoError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise KosmoError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"format": "pt", **(metadata or {})}))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise KosmoError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise KosmoError(f"{path}: not a readable safetensors file ({e})") from None


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without aliases (tied weights are stored once, under their first name)."""
    seen, out = set(), {}
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen and t.numel():
            continue
        seen.add(t.data_ptr())
        out[name] = t
    return out


def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str | Path):
    """Copies tensors into the model, with errors naming the checkpoint and the tensor at fault."""
    expected = model.state_dict()
    aliases = {n for n in expected if n not in model_tensors(model)}
    for name, t in tensors.items():
        if name not in expected:
            raise KosmoError(f"{source}: unexpected tensor '{name}' (checkpoint of another model?)")
        if tuple(t.shape) != tuple(expected[name].shape):
            raise KosmoError(f"{source}: tensor '{name}' has shape {tuple(t.shape)}, "
                             f"the model expects {tuple(expected[name].shape)} (checkpoint of the wrong shape)")
    missing = [n for n in expected if n not in tensors and n not in aliases]
    if missing:
        raise KosmoError(f"{source}: missing tensor '{missing[0]}' ({len(missing)} missing in all)")
    model.load_state_dict(tensors, strict=False)  # tied aliases are absent from the file by design
