#!/usr/bin/env python
"""Encode/decode a safetensors state dict with NNCodec (MPEG NNC / DeepCABAC).

This script runs INSIDE the separate NNCodec venv (``.venv-nncodec``, numpy<2);
it must not import ``hf_vae_compress``. The main venv's benchmark calls it via
subprocess and exchanges files only::

    .venv-nncodec/bin/python benchmarks/nncodec_runner.py \
        --input weights_fp32.safetensors --output-dir DIR \
        --mode {qp,opt_qp,per_tensor} [--qp INT] [--qp-map qps.json] [--no-dq] \
        [--lambda-scale FLOAT] [--nonweight-qp INT]

Modes (all call ``nncodec.nnc.compress`` with qp_density=2, param_opt=True,
row_skipping=True, use_dq=not --no-dq, lambda_scale=--lambda-scale (0),
nonweight_qp=--nonweight-qp (-75)):

* ``qp``         -- ``qp=QP``: every tensor with ndim > 1 ("weight") is quantized
                    at QP; 1-D tensors ("unspecified") at nonweight_qp.
* ``opt_qp``     -- ``qp=QP, opt_qp=True``: NNCodec's own per-tensor QP
                    heuristic (``ApproxInfo._modify_qp``) starting from QP. It only
                    touches weight tensors: qp_t = round(QP * (1 - w_t)) with
                    w_t = numel_t/sum(numel) + 0.1*(1 - std_t/max std) (w_t > .5
                    is replaced by .15). Larger / lower-variance tensors get a
                    coarser QP. It is a size/std heuristic, not an RD search.
* ``per_tensor`` -- ``qp=QP, qp_per_tensor=MAP``: explicit QPs per tensor name from
                    --qp-map (JSON object name -> int). Weight tensors missing from
                    the map use QP, 1-D tensors missing from it use nonweight_qp.
                    A 1-D tensor named in the map gets the mapped QP (NNCodec's
                    behaviour).

``--lambda-scale`` is NNCodec's rate term in quantization (DeepCABAC's ``Quant.cpp``): 0
(its default) rounds to the nearest level without DQ and runs the trellis on distortion alone
with DQ; above 0 each level choice minimises distortion / (lambda_scale * ln2/6, times 4 * 0.7
for the trellis) + the CABAC rate of the level, in units of the squared step -- RDOQ without
DQ, a rate-aware trellis with it. Larger values zero more weights at the same step.

Outputs in --output-dir:
  bitstream.nnc         the NNCodec bitstream (exact bytes)
  decoded.safetensors   decoded float tensors as float32 (same names / shapes) plus
                        the non-float tensors copied unchanged
  result.json           summary (also printed as the only line on stdout)

``bytes`` = bitstream bytes + raw bytes of the tensors that are not coded by
NNCodec (non-float tensors and empty float tensors), counted as numel*itemsize,
i.e. uncompressed.

Everything except the final one-line JSON goes to stderr (NNCodec's own prints
included). Exit status is non-zero with a message on stderr on any failure;
NNCodec's ``SystemExit`` is converted into such an error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback


def _log(msg: str) -> None:
    print(f"[nncodec_runner] {msg}", file=sys.stderr, flush=True)


class RunnerError(Exception):
    """A failure with a message meant for the user."""


def _redirect_stdout_to_stderr():
    """Route fd 1 (Python prints and C++ writes alike) to stderr.

    Returns a text file on the original stdout for the final JSON line.
    """
    sys.stdout.flush()
    real = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return real


def _short(obj, limit: int = 600) -> str:
    s = str(obj)
    return s if len(s) <= limit else s[:limit] + f"... [{len(s) - limit} more chars]"


# NNCodec treats names ending in "_G"/"_H" as low-rank decomposition factors and
# asserts that "_G"/"_H" appear nowhere else in a name (init_approx_data), so
# such names crash (AssertionError / KeyError). They are renamed for coding.
def _needs_rename(name: str) -> bool:
    return "_G" in name or "_H" in name


def _parse_args(argv):
    p = argparse.ArgumentParser(
        description="Encode/decode a safetensors state dict with NNCodec (MPEG NNC).",
    )
    p.add_argument("--input", required=True, help="fp32 safetensors state dict")
    p.add_argument("--output-dir", required=True, help="directory for outputs (created)")
    p.add_argument("--mode", required=True, choices=["qp", "opt_qp", "per_tensor"])
    p.add_argument("--qp", type=int, default=-38,
                   help="QP for weight tensors (ndim>1); start QP for opt_qp; "
                        "fallback for per_tensor (default -38, NNCodec's default)")
    p.add_argument("--qp-map", default=None,
                   help="JSON file {tensor_name: int qp}; required for --mode per_tensor")
    p.add_argument("--no-dq", action="store_true",
                   help="disable dependent (trellis) quantization (use_dq=False)")
    p.add_argument("--lambda-scale", type=float, default=0.0,
                   help="rate term of NNCodec's quantizer (RDOQ / rate-aware trellis); 0: none (default)")
    p.add_argument("--nonweight-qp", type=int, default=-75,
                   help="QP for 1-D tensors (NNCodec default -75, near-lossless)")
    args = p.parse_args(argv)
    if args.mode == "per_tensor" and not args.qp_map:
        p.error("--mode per_tensor requires --qp-map")
    if args.mode != "per_tensor" and args.qp_map:
        p.error("--qp-map is only used with --mode per_tensor")
    if not args.lambda_scale >= 0:
        p.error("--lambda-scale must be >= 0")
    return args


def _load_qp_map(path: str) -> dict:
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise RunnerError(f"cannot read --qp-map {path!r}: {e}") from e
    if not isinstance(raw, dict):
        raise RunnerError(f"--qp-map {path!r} must hold a JSON object name -> int qp")
    out = {}
    for k, v in raw.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
            raise RunnerError(f"--qp-map: QP for {k!r} must be an integer, got {v!r}")
        out[k] = int(v)
    return out


def _load_state_dict(path: str):
    """Return (ordered dict name -> torch.Tensor, metadata)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise RunnerError(f"--input {path!r} does not exist")
    try:
        tensors = {}
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except Exception as e:  # noqa: BLE001
        raise RunnerError(f"cannot read safetensors {path!r}: {e}") from e
    if not tensors:
        raise RunnerError(f"{path!r} holds no tensors")
    return tensors, meta


def _call_nncodec(what: str, fn, *a, **kw):
    """Call an NNCodec function, turning SystemExit/exceptions into RunnerError."""
    try:
        return fn(*a, **kw)
    except SystemExit as e:
        raise RunnerError(f"NNCodec {what} aborted with SystemExit: {_short(e.code)}") from None
    except Exception as e:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        raise RunnerError(f"NNCodec {what} failed: {type(e).__name__}: {_short(e)}") from e


def _effective_qps(params, qp, qp_density, nonweight_qp, qp_per_tensor, opt_qp, use_dq, lambda_scale):
    """Per-tensor QPs exactly as nnc.compress computes them (same NNCodec code path)."""
    from nncodec import nnc_core

    mdl = nnc_core.nnr_model.NNRModel(params)
    approx_data = nnc_core.approximator.init_approx_data(
        params, mdl.model_info, qp_density=qp_density, scan_order=0)
    info = nnc_core.approximator.ApproxInfo(
        approx_data, mdl.model_info, "uniform", 0, qp, opt_qp, not use_dq, 10, lambda_scale,
        nonweight_qp=nonweight_qp, qp_per_tensor=qp_per_tensor).approx_info
    return {k: int(v) for k, v in info["qp"].items()}


def run(args) -> dict:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    try:
        from importlib.metadata import version
        nncodec_version = version("nncodec")
    except Exception:  # noqa: BLE001
        nncodec_version = "unknown"
    try:
        from nncodec import nnc
    except Exception as e:  # noqa: BLE001
        raise RunnerError(f"cannot import nncodec (run this inside .venv-nncodec): {e}") from e

    use_dq = not args.no_dq
    qp_density = 2
    os.makedirs(args.output_dir, exist_ok=True)

    tensors, meta = _load_state_dict(args.input)

    # Split: float tensors with >0 elements go to NNCodec; everything else is raw.
    float_names, raw_names = [], []
    for k, t in tensors.items():
        (float_names if (t.is_floating_point() and t.numel() > 0) else raw_names).append(k)
    raw_bytes = int(sum(tensors[k].numel() * tensors[k].element_size() for k in raw_names))
    cast = sorted({str(tensors[k].dtype) for k in float_names} - {"torch.float32"})
    if cast:
        _log(f"casting float tensors of dtype {cast} to float32 for coding")
    if raw_names:
        _log(f"{len(raw_names)} tensor(s) copied raw ({raw_bytes} bytes): "
             f"{_short(raw_names, 300)}")

    qp_map = None
    if args.mode == "per_tensor":
        qp_map = _load_qp_map(args.qp_map)
        unknown = sorted(set(qp_map) - set(float_names))
        if unknown:
            raise RunnerError(
                f"--qp-map names tensors that are not non-empty float tensors of the "
                f"input: {_short(unknown, 300)}")

    # Coding names: NNCodec cannot handle names with "_G"/"_H"; rename those.
    code_name = {}
    taken = set(tensors)
    i = 0
    for k in float_names:
        if _needs_rename(k):
            while f"nncr_{i}" in taken:
                i += 1
            code_name[k] = f"nncr_{i}"
            taken.add(code_name[k])
        else:
            code_name[k] = k
    renamed = {k: v for k, v in code_name.items() if k != v}
    if renamed:
        _log(f"renamed {len(renamed)} tensor(s) whose names contain '_G'/'_H' for coding")
    orig_name = {v: k for k, v in code_name.items()}

    params = {}
    for k in float_names:
        a = tensors[k].detach().to(torch.float32).contiguous().numpy()
        if a.ndim == 0:  # NNCodec crashes on 0-d arrays (IndexError in coder)
            a = a.reshape(1)
        if not np.all(np.isfinite(a)):
            raise RunnerError(f"tensor {k!r} contains non-finite values")
        params[code_name[k]] = np.ascontiguousarray(a)
    num_float_values = int(sum(a.size for a in params.values()))

    kw = dict(qp=int(args.qp), qp_density=qp_density, nonweight_qp=int(args.nonweight_qp),
              use_dq=use_dq, lambda_scale=float(args.lambda_scale), param_opt=True, row_skipping=True)
    if args.mode == "opt_qp":
        kw["opt_qp"] = True
    elif args.mode == "per_tensor":
        kw["qp_per_tensor"] = {code_name[k]: v for k, v in qp_map.items()}

    bitstream = b""
    encode_s = decode_s = 0.0
    decoded = {}
    qps_used = {}
    max_abs_err = 0.0
    if params:
        qps_used = _call_nncodec(
            "QP setup", _effective_qps, params, kw["qp"], qp_density, kw["nonweight_qp"],
            kw.get("qp_per_tensor"), kw.get("opt_qp", False), use_dq, kw["lambda_scale"])
        # The bitstream codes each tensor's QP as a signed (6 + qp_density)-bit
        # integer (iae_v, mps_quantization_parameter = 0); out-of-range values
        # silently wrap and decode with a different step size, so refuse them.
        lo, hi = -(1 << (5 + qp_density)), (1 << (5 + qp_density)) - 1
        bad = {orig_name[c]: q for c, q in qps_used.items() if not lo <= q <= hi}
        if bad:
            raise RunnerError(f"QP(s) outside the codable range [{lo}, {hi}] for "
                              f"qp_density={qp_density}: {_short(bad, 300)}")
        _log(f"mode={args.mode} qp={args.qp} dq={use_dq} lambda_scale={args.lambda_scale}: coding {len(params)} float "
             f"tensor(s), {num_float_values} values")
        t0 = time.perf_counter()
        bs = _call_nncodec("compress", nnc.compress, dict(params), bitstream_path=None,
                           return_bitstream=True, verbose=False, **kw)
        encode_s = time.perf_counter() - t0
        if not isinstance(bs, (bytes, bytearray)) or len(bs) == 0:
            raise RunnerError(f"nnc.compress returned no bitstream (got {type(bs).__name__})")
        bitstream = bytes(bs)
        t0 = time.perf_counter()
        rec = _call_nncodec("decompress", nnc.decompress, bytearray(bitstream))
        decode_s = time.perf_counter() - t0
        if not isinstance(rec, dict) or set(rec) != set(params):
            got = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise RunnerError(f"decoded tensor names differ from encoded ones: "
                              f"{_short(got, 300)}")
        for cname, arr in rec.items():
            k = orig_name[cname]
            shape = tuple(tensors[k].shape)
            arr = np.asarray(arr, dtype=np.float32)
            if arr.size != tensors[k].numel():
                raise RunnerError(f"decoded {k!r} has {arr.size} values, expected "
                                  f"{tensors[k].numel()} (shape {shape})")
            arr = arr.reshape(shape)
            max_abs_err = max(max_abs_err, float(np.max(np.abs(arr - params[cname].reshape(shape)))))
            decoded[k] = torch.from_numpy(arr.copy(order="C"))  # not ascontiguousarray: keeps 0-d

    bs_path = os.path.join(args.output_dir, "bitstream.nnc")
    with open(bs_path, "wb") as f:
        f.write(bitstream)

    out = {}
    for k, t in tensors.items():
        if k in decoded:
            out[k] = decoded[k]
        elif t.is_floating_point():  # empty float tensor, kept as float32
            out[k] = t.detach().to(torch.float32).contiguous()
        else:
            out[k] = t.detach().contiguous()
    save_file(out, os.path.join(args.output_dir, "decoded.safetensors"),
              metadata=dict(meta) if meta else None)

    bitstream_bytes = len(bitstream)
    result = {
        "mode": args.mode,
        "qp": int(args.qp),
        "dq": use_dq,
        "lambda_scale": float(args.lambda_scale),
        "nonweight_qp": int(args.nonweight_qp),
        "qp_density": qp_density,
        "bytes": bitstream_bytes + raw_bytes,
        "bitstream_bytes": bitstream_bytes,
        "raw_bytes": raw_bytes,
        "encode_s": round(encode_s, 6),
        "decode_s": round(decode_s, 6),
        "num_float_values": num_float_values,
        "num_float_tensors": len(float_names),
        "raw_tensors": raw_names,
        "max_abs_err": max_abs_err,
        "bits_per_float_value": (8.0 * bitstream_bytes / num_float_values
                                 if num_float_values else None),
        "qp_per_tensor_used": {orig_name[c]: q for c, q in qps_used.items()},
        "renamed_for_coding": renamed,
        "cast_to_float32_from": cast,
        "nncodec_version": nncodec_version,
    }
    with open(os.path.join(args.output_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def main(argv=None) -> int:
    args = _parse_args(argv)
    json_out = _redirect_stdout_to_stderr()
    try:
        result = run(args)
    except RunnerError as e:
        _log(f"error: {e}")
        return 2
    except SystemExit as e:  # any stray SystemExit (e.g. from NNCodec internals)
        _log(f"error: unexpected SystemExit: {_short(e.code)}")
        return 2
    except Exception as e:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        _log(f"error: {type(e).__name__}: {_short(e)}")
        return 1
    json_out.write(json.dumps(result) + "\n")
    json_out.flush()
    _log(f"done: {result['bytes']} bytes ({result['bitstream_bytes']} bitstream + "
         f"{result['raw_bytes']} raw), encode {result['encode_s']:.3f}s, "
         f"decode {result['decode_s']:.3f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
