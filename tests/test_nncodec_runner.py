"""benchmarks/nncodec_runner.py, run as a subprocess inside the separate NNCodec venv."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "benchmarks" / "nncodec_runner.py"
NNC_PYTHON = REPO / ".venv-nncodec" / "bin" / "python"
QPS = (-38, -20)  # fine, coarse

pytestmark = pytest.mark.skipif(
    not NNC_PYTHON.exists(),
    reason=f"NNCodec venv not found ({NNC_PYTHON}); NNCodec (numpy<2) lives in its own venv",
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nncodec")
    rng = np.random.default_rng(0)
    sd = {
        "conv.weight": (rng.standard_normal((64, 32, 3, 3)) * 0.05).astype(np.float32),
        "fc.weight": (rng.standard_normal((10, 64)) * 0.1).astype(np.float32),
        "fc.bias": (rng.standard_normal(10) * 0.1).astype(np.float32),
        "bn.num_batches_tracked": np.array(12345, dtype=np.int64),
    }
    inp = tmp / "weights_fp32.safetensors"
    save_file(sd, str(inp))
    out = {}
    for qp in QPS:
        d = tmp / f"qp{qp}"
        proc = subprocess.run(
            [str(NNC_PYTHON), str(RUNNER), "--input", str(inp), "--output-dir", str(d),
             "--mode", "qp", "--qp", str(qp)],
            capture_output=True, text=True, timeout=180, cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert proc.returncode == 0, f"runner failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}"
        lines = proc.stdout.strip().splitlines()
        assert len(lines) == 1, f"stdout must be one JSON line, got: {proc.stdout!r}"
        out[qp] = dict(stdout=json.loads(lines[0]), dir=d,
                       result=json.loads((d / "result.json").read_text()),
                       decoded=load_file(str(d / "decoded.safetensors")))
    return sd, out


def test_decoded_names_shapes_dtypes(runs):
    sd, out = runs
    for qp in QPS:
        dec = out[qp]["decoded"]
        assert set(dec) == set(sd)
        for k, v in sd.items():
            assert dec[k].shape == v.shape, k
            assert dec[k].dtype == v.dtype, k
        np.testing.assert_array_equal(dec["bn.num_batches_tracked"], sd["bn.num_batches_tracked"])


def test_error_small_and_grows_with_qp(runs):
    sd, out = runs
    fine, coarse = (out[qp]["decoded"] for qp in QPS)
    for k in ("conv.weight", "fc.weight"):
        err_f = np.abs(fine[k] - sd[k])
        err_c = np.abs(coarse[k] - sd[k])
        assert err_f.max() < 0.01, k           # step ~1.5e-3 at QP -38
        assert err_c.max() < 0.1, k            # step ~3.1e-2 at QP -20
        assert np.sqrt((err_f ** 2).mean()) < np.sqrt((err_c ** 2).mean()), k
    for dec in (fine, coarse):                 # 1-D tensors use nonweight_qp -75
        assert np.abs(dec["fc.bias"] - sd["fc.bias"]).max() < 1e-4


def test_bytes_accounting(runs):
    sd, out = runs
    raw = sd["bn.num_batches_tracked"].nbytes
    for qp in QPS:
        r = out[qp]["result"]
        assert r == out[qp]["stdout"]
        size = (out[qp]["dir"] / "bitstream.nnc").stat().st_size
        assert r["mode"] == "qp" and r["qp"] == qp and r["dq"] is True
        assert r["bitstream_bytes"] == size > 0
        assert r["raw_bytes"] == raw
        assert r["bytes"] == size + raw
        assert r["num_float_values"] == sum(v.size for v in sd.values() if v.dtype.kind == "f")
        assert r["encode_s"] > 0 and r["decode_s"] > 0
        assert r["nncodec_version"]
    assert out[QPS[1]]["result"]["bytes"] < out[QPS[0]]["result"]["bytes"]
