"""Decode containers in this process and print one JSON object: what a machine makes of them.

Run as ``python -m tests.decode_probe PATH...`` (a container file or a compressed folder each),
typically under other CPU-kernel settings (``ATEN_CPU_CAPABILITY``, ``MKL_ENABLE_INSTRUCTIONS``) to
play another machine. ``float_probe`` digests a small matmul and a GELU MLP: that it differs
between two settings is what shows the settings changed float results at all. Each container
gets a ``status``: ``ok`` (with the digest of every decoded tensor's name, dtype, shape and
bytes), ``machine_dependent`` or ``corrupt`` (the two integrity errors), or ``error``.
"""

from __future__ import annotations

import json
import sys

import torch

from hf_vae_compress import CompressedModel, ContainerError, IntegrityError
from hf_vae_compress.codec.format.integrity import MachineDependentError, ModelHash


def float_probe() -> str:
    """Digest of float kernels whose bits depend on the CPU code path: a matmul and a GELU MLP."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 300, generator=generator)
    w1, w2 = torch.randn(300, 129, generator=generator), torch.randn(129, 9, generator=generator)
    digest = ModelHash()
    digest.update("matmul", x @ w1)
    digest.update("mlp", torch.nn.functional.gelu(x @ w1) @ w2)
    return digest.digest().hex()


def probe(path: str) -> dict:
    try:
        digest = ModelHash()
        for name, tensor in CompressedModel.load(path).iter_decoded(allow_unverified=False):
            digest.update(name, tensor)
        return dict(status="ok", digest=digest.digest().hex())
    except MachineDependentError as err:
        return dict(status="machine_dependent", message=str(err))
    except IntegrityError as err:
        return dict(status="corrupt", message=str(err))
    except ContainerError as err:
        return dict(status="error", message=str(err))


def main(paths: list[str]) -> None:
    print(json.dumps(dict(capability=torch.backends.cpu.get_cpu_capability(), float_probe=float_probe(),
                          containers={p: probe(p) for p in paths})))


if __name__ == "__main__":
    main(sys.argv[1:])
