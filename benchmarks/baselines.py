"""Plain baselines, each written to a real safetensors file whose size is what gets reported.

* fp32 / fp16: the state dict cast and saved;
* int8 / int4: symmetric per-output-channel quantization of every tensor with two or more
  dimensions (int4 nibble-packed), fp16 scales; other tensors in fp16, like our codec stores them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _float_state(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}


def write_float(state_dict: dict[str, torch.Tensor], path: Path, dtype: torch.dtype) -> int:
    save_file(_float_state(state_dict, dtype), str(path))
    return path.stat().st_size


def read_float(path: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    loaded = load_file(str(path))
    return {k: loaded[k].to(like[k].dtype) for k in like}


def _quantizable(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.dim() >= 2


def write_int(state_dict: dict[str, torch.Tensor], path: Path, bits: int) -> int:
    """Per-channel symmetric integer quantization; returns the file size."""
    qmax = 2 ** (bits - 1) - 1
    out = {}
    for name, t in state_dict.items():
        if not _quantizable(t):
            out[name] = t.to(torch.float16) if t.is_floating_point() else t
            continue
        rows = t.float().reshape(t.shape[0], -1)
        scale = (rows.abs().amax(1) / qmax).clamp_min(1e-12).to(torch.float16)
        q = torch.round(rows / scale.float()[:, None]).clamp(-qmax, qmax).to(torch.int8)
        out[f"{name}.scale"] = scale
        if bits == 8:
            out[f"{name}.q"] = q
        else:
            flat = (q.reshape(-1) + 8).to(torch.uint8)  # 0..15
            flat = torch.nn.functional.pad(flat, (0, flat.numel() % 2))
            out[f"{name}.q"] = flat[0::2] | (flat[1::2] << 4)
    save_file({k: v.contiguous() for k, v in out.items()}, str(path), metadata={"bits": str(bits)})
    return path.stat().st_size


def read_int(path: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    stored = load_file(str(path))
    bits = 8 if stored[next(k for k in stored if k.endswith(".q"))].dtype == torch.int8 else 4
    out = {}
    for name, ref in like.items():
        if not _quantizable(ref):
            out[name] = stored[name].to(ref.dtype)
            continue
        q = stored[f"{name}.q"]
        if bits == 4:
            q = torch.stack([q & 0xF, q >> 4], 1).reshape(-1)[: ref.numel()].to(torch.int8) - 8
        rows = q.reshape(ref.shape[0], -1).float() * stored[f"{name}.scale"].float()[:, None]
        out[name] = rows.reshape(ref.shape).to(ref.dtype)
    return out
