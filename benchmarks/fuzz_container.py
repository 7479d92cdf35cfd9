"""Fuzz the container reader with mutated real containers (``make fuzz``).

A container fetched from the Hub is untrusted input. This mutates real containers of every
reference model and decodes each mutant in a worker process under limits, classifying it as:

* ``refused``: a clear :class:`ContainerError` (``IntegrityError`` included);
* ``harmless``: decoded bit-identical to the clean container (the mutation touched nothing read);
* ``silently_wrong``: decoded without an error to weights that differ: the failure that must never happen;
* ``other_exception``: any exception that is not one of the library's documented errors;
* ``over_limit``: more than ``--seconds`` per case, or more than ``--max-rss-gb`` of peak memory.

Byte-level mutations work on the file: bit flips anywhere and in the safetensors header,
truncation at every region boundary and at random points, random runs, digits edited in the
safetensors header (offsets and shapes), swapped blocks, appended bytes. Structure-aware
mutations decode the container's own JSON header, set one field (names, shapes, steps, counts,
lengths, table bounds, format version, dtype names, transform sizes, or any other leaf) to an
absurd value, and re-encode a well-formed file. Bombs put a zlib header that inflates to
gigabytes, and foreign files are plain safetensors checkpoints, with and without our metadata.

Writes ``benchmarks/results/fuzz.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import platform
import random
import resource
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "outputs" / "fuzz"
MODELS = ["fmnist-resnet18", "fmnist-mobilenetv3", "fmnist-vit", "fmnist-rtdetr"]
BYTE_KINDS = ["bit_flip", "header_bit_flip", "truncate_boundary", "truncate_random", "random_run", "digit_edit",
              "swap_blocks", "append"]
STRUCTURE_KINDS = ["field_value", "swap_names", "duplicate_name", "format_version", "dtype_name", "transform_size",
                   "drop_field"]
OTHER_KINDS = ["header_bomb", "foreign"]
ABSURD = [-1, 0, 1, 2 ** 31, 2 ** 40, 2 ** 63, -(2 ** 63), 1.5, -0.0, 1e308, "x", "", None, True, [], {}, [1, 2],
          {"a": 1}, "NaN"]


# ---------------------------------------------------------------------------------------------
# Containers and their regions


def container_for(name: str) -> bytes:
    """A v2 container of the reference model, post-hoc (identity, 2 bits/weight), cached in outputs/."""
    from hf_vae_compress.codec import folder_container

    folder = WORK / name
    if not folder_container(folder).exists():
        from hf_vae_compress import VAECompressionConfig
        from hf_vae_compress.pipeline import compress_folder

        compress_folder(str(ROOT / "reference_models" / name), folder,
                        VAECompressionConfig(target_bits_per_weight=2.0, transform="identity"), dataset=None,
                        progress=False)
    return folder_container(folder).read_bytes()


def regions(data: bytes) -> tuple[int, list[int]]:
    """The safetensors header length and every region boundary of the file."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8: 8 + n])
    bounds = {0, 8, 8 + n, len(data)}
    for key, entry in header.items():
        if key != "__metadata__":
            bounds.update(8 + n + offset for offset in entry["data_offsets"])
    return n, sorted(bounds)


def split(data: bytes) -> tuple[dict, dict, dict]:
    """(safetensors metadata, our JSON header, the other entries as raw bytes with dtype and shape)."""
    n = struct.unpack("<Q", data[:8])[0]
    table = json.loads(data[8: 8 + n])
    metadata = table.pop("__metadata__", {})
    entries = {k: (v["dtype"], v["shape"], data[8 + n + v["data_offsets"][0]: 8 + n + v["data_offsets"][1]])
               for k, v in table.items()}
    header = json.loads(zlib.decompress(entries.pop("header")[2]))
    return metadata, header, entries


def join(metadata: dict, header: dict | bytes, entries: dict) -> bytes:
    """A well-formed safetensors file from parts (the header JSON zlib-packed unless given as bytes)."""
    packed = header if isinstance(header, bytes) else zlib.compress(json.dumps(header).encode(), 6)
    everything = {"header": ("U8", [len(packed)], packed), **entries}
    table, offset, blobs = {"__metadata__": metadata}, 0, []
    for key in sorted(everything):
        dtype, shape, blob = everything[key]
        table[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    text = json.dumps(table, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


# ---------------------------------------------------------------------------------------------
# Mutations: each takes the clean bytes and a seeded Random and returns the mutant


def mutate_bytes(kind: str, data: bytes, rng: random.Random) -> bytes:
    n, bounds = regions(data)
    out = bytearray(data)
    if kind == "bit_flip":
        at = rng.randrange(len(out))
        out[at] ^= 1 << rng.randrange(8)
    elif kind == "header_bit_flip":
        at = 8 + rng.randrange(n)
        out[at] ^= 1 << rng.randrange(8)
    elif kind == "truncate_boundary":
        out = out[: max(0, rng.choice(bounds) + rng.choice([-1, 0, 1]))]
    elif kind == "truncate_random":
        out = out[: rng.randrange(len(out))]
    elif kind == "random_run":
        at, length = rng.randrange(len(out)), rng.randint(1, 64)
        out[at: at + length] = bytes(rng.randrange(256) for _ in range(length))[: len(out) - at]
    elif kind == "digit_edit":
        digits = [i for i in range(8, 8 + n) if chr(out[i]).isdigit()]
        at = rng.choice(digits)
        out[at] = ord(rng.choice("0123456789".replace(chr(out[at]), "")))
    elif kind == "swap_blocks":
        length = rng.randint(1, max(1, len(out) // 16))
        a, b = sorted(rng.sample(range(len(out) - length), 2))
        if b - a >= length:
            out[a: a + length], out[b: b + length] = out[b: b + length], out[a: a + length]
    elif kind == "append":
        out += bytes(rng.randrange(256) for _ in range(rng.randint(1, 4096)))
    return bytes(out)


def _paths(value, prefix=()):
    """Every path into a JSON value (dict keys and list indices), leaves and containers alike."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:64]):
            yield from _paths(v, (*prefix, i))


def _set(value, path, new):
    for key in path[:-1]:
        value = value[key]
    value[path[-1]] = new


def mutate_structure(kind: str, data: bytes, rng: random.Random) -> bytes:
    metadata, header, entries = split(data)
    tensors = header.get("tensors", [])
    if kind == "field_value":
        path = rng.choice([p for p in _paths(header) if p])
        _set(header, path, rng.choice(ABSURD))
    elif kind == "swap_names":
        same = {}
        for e in tensors:
            same.setdefault((tuple(e["shape"]), e["dtype"], e["codec"]), []).append(e)
        groups = [g for g in same.values() if len(g) > 1] or [tensors]
        a, b = rng.sample(rng.choice(groups), 2)
        a["name"], b["name"] = b["name"], a["name"]
    elif kind == "duplicate_name":
        a, b = rng.sample(tensors, 2)
        a["name"] = b["name"]
    elif kind == "format_version":
        header["format_version"] = rng.choice([0, 1, 3, -2, "2", 2.0, None, 2 ** 40])
        if rng.random() < 0.5:
            metadata = {"format": f"hf-vae-compress/{rng.choice(['1', '3', '', 'x', '99999999999999999999'])}"}
    elif kind == "dtype_name":
        rng.choice(tensors)["dtype"] = rng.choice(["float64", "complex64", "int8", "bool", "bogus", "torch.float32",
                                                   "", "__class__", "float8_e4m3fn"])
    elif kind == "transform_size":
        key = rng.choice(["chunk_size", "hidden_size"])
        header["transform"][key] = rng.choice([0, -1, 1, 2, 8, 10, 2 ** 20, 2 ** 40, 1.5, "9"])
    elif kind == "drop_field":
        path = rng.choice([p for p in _paths(header) if p and isinstance(p[-1], str)])
        parent = header
        for key in path[:-1]:
            parent = parent[key]
        del parent[path[-1]]
    return join(metadata, header, entries)


@functools.lru_cache(maxsize=None)
def zlib_bomb(size: int) -> bytes:
    """``size`` bytes of JSON whitespace, zlib-compressed (about a thousandth of the size)."""
    bomb = zlib.compressobj(9)
    chunk = b" " * (1 << 24)
    return b"".join(bomb.compress(chunk) for _ in range(size >> 24)) + bomb.flush()


def mutate_other(kind: str, data: bytes, rng: random.Random, foreign: bytes) -> bytes:
    metadata, _, entries = split(data)
    if kind == "header_bomb":
        return join(metadata, zlib_bomb(rng.choice([1 << 28, 1 << 30, 1 << 32])), entries)  # 256 MB to 4 GB inflated
    if rng.random() < 0.5:
        return foreign  # a plain checkpoint named like a container
    m_n = struct.unpack("<Q", foreign[:8])[0]
    table = json.loads(foreign[8: 8 + m_n])
    table["__metadata__"] = {"format": "hf-vae-compress/2"}  # a foreign file that claims to be ours
    entries = {k: (v["dtype"], v["shape"], foreign[8 + m_n + v["data_offsets"][0]: 8 + m_n + v["data_offsets"][1]])
               for k, v in table.items() if k != "__metadata__"}
    header = {"format": "hf-vae-compress", "format_version": 2, "tensors": []}
    return join(table["__metadata__"], header, entries)


def make_case(kind: str, data: bytes, rng: random.Random, foreign: bytes) -> bytes:
    if kind in BYTE_KINDS:
        return mutate_bytes(kind, data, rng)
    if kind in STRUCTURE_KINDS:
        return mutate_structure(kind, data, rng)
    return mutate_other(kind, data, rng, foreign)


# ---------------------------------------------------------------------------------------------
# The worker: decodes mutants under an address-space limit and reports one verdict per case


def _worker(conn, address_space_gb: float) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (int(address_space_gb * 2 ** 30),) * 2)
    import torch

    from hf_vae_compress.codec import CompressedModel, ContainerError

    torch.set_num_threads(1)
    references: dict[str, dict] = {}
    scratch = Path(tempfile.mkdtemp(prefix="fuzz-"))
    while True:
        message = conn.recv()
        if message is None:
            return
        model, clean, mutant = message
        if model not in references:
            path = scratch / "clean.safetensors"
            path.write_bytes(clean)
            references[model] = CompressedModel.load(path).decode()
        path = scratch / "case.safetensors"
        path.write_bytes(mutant)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        try:
            decoded = CompressedModel.load(path).decode()
            reference = references[model]
            differ = sorted(set(decoded) ^ set(reference)) or [
                k for k in reference if decoded[k].dtype != reference[k].dtype or not torch.equal(decoded[k], reference[k])]
            verdict, detail = ("silently_wrong", f"decoded to other weights: {differ[:3]}") if differ else ("harmless", "")
        except ContainerError as err:
            verdict, detail = "refused", f"{type(err).__name__}: {err}"[:200]
        except MemoryError as err:
            verdict, detail = "over_limit", f"MemoryError: {err}"[:200]
        except Exception as err:  # noqa: BLE001 - classifying every exception is the point
            verdict, detail = "other_exception", f"{type(err).__name__}: {err}"[:300]
        seconds = time.perf_counter() - start
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        conn.send((verdict, detail, seconds, peak_kb if peak_kb > before else 0))


class Decoder:
    """A worker process; restarted after a case that hangs or raises its memory peak past the limit."""

    def __init__(self, address_space_gb: float):
        self.address_space_gb = address_space_gb
        self._start()

    def _start(self) -> None:
        self.conn, child = mp.Pipe()
        self.proc = mp.get_context("fork").Process(target=_worker, args=(child, self.address_space_gb), daemon=True)
        self.proc.start()

    def restart(self) -> None:
        self.proc.kill()
        self.proc.join()
        self._start()

    def run(self, model: str, clean: bytes, mutant: bytes, seconds: float) -> tuple[str, str, float, int]:
        self.conn.send((model, clean, mutant))
        if not self.conn.poll(max(seconds * 3, 30)):  # a hang: the worker is killed, the case is over the limit
            self.restart()
            return "over_limit", f"no answer within {max(seconds * 3, 30):.0f} s", float("inf"), 0
        try:
            return self.conn.recv()
        except EOFError:  # the worker died (e.g. killed by the OS)
            self.restart()
            return "other_exception", "the decoding process died", 0.0, 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--cases", type=int, default=10_500, help="total cases over all models")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--structure-share", type=float, default=0.35)
    parser.add_argument("--seconds", type=float, default=10.0, help="time limit per case")
    parser.add_argument("--max-rss-gb", type=float, default=2.0, help="peak memory limit per case")
    parser.add_argument("--address-space-gb", type=float, default=8.0, help="RLIMIT_AS of the decoding process")
    parser.add_argument("--output", type=Path, default=RESULTS / "fuzz.json")
    args = parser.parse_args(argv)

    containers = {m: container_for(m) for m in args.models}
    foreign = (ROOT / "reference_models" / "fmnist-vit" / "model.safetensors").read_bytes()
    rng = random.Random(args.seed)
    decoder = Decoder(args.address_space_gb)
    counts: Counter = Counter()
    by_kind: dict[str, Counter] = {}
    examples: dict[str, list] = {}
    worst_seconds, worst_rss_kb = 0.0, 0
    start = time.perf_counter()
    for case in range(args.cases):
        model = args.models[case % len(args.models)]
        roll = rng.random()
        if roll < args.structure_share:
            kind = rng.choice(STRUCTURE_KINDS)
        elif roll < args.structure_share + 0.01:
            kind = rng.choice(OTHER_KINDS)
        else:
            kind = rng.choice(BYTE_KINDS)
        mutant = make_case(kind, containers[model], random.Random(rng.random()), foreign)
        verdict, detail, seconds, peak_kb = decoder.run(model, containers[model], mutant, args.seconds)
        if verdict not in ("over_limit", "other_exception") and (seconds > args.seconds
                                                                 or peak_kb > args.max_rss_gb * 2 ** 20):
            verdict, detail = "over_limit", f"{seconds:.1f} s, peak {peak_kb / 2 ** 20:.2f} GB; was {verdict}"
        if peak_kb > args.max_rss_gb * 2 ** 20:
            decoder.restart()  # ru_maxrss only grows: a fresh process measures the next case's peak
        worst_seconds = max(worst_seconds, seconds if seconds != float("inf") else args.seconds * 3)
        worst_rss_kb = max(worst_rss_kb, peak_kb)
        group = "structure" if kind in STRUCTURE_KINDS else "byte" if kind in BYTE_KINDS else kind
        counts[(group, verdict)] += 1
        by_kind.setdefault(kind, Counter())[verdict] += 1
        if verdict in ("silently_wrong", "other_exception", "over_limit") and len(examples.setdefault(verdict, [])) < 20:
            examples[verdict].append(dict(case=case, model=model, kind=kind, detail=detail))
        if case % 500 == 0:
            print(f"{case}/{args.cases} cases, {time.perf_counter() - start:.0f} s: {dict(counts)}", file=sys.stderr)
    decoder.conn.send(None)
    totals = Counter()
    for (_, verdict), n in counts.items():
        totals[verdict] += n
    result = dict(
        cases=args.cases, seed=args.seed, models=args.models, seconds=round(time.perf_counter() - start, 1),
        limits=dict(seconds_per_case=args.seconds, max_rss_gb=args.max_rss_gb, address_space_gb=args.address_space_gb),
        totals=dict(totals),
        by_group={g: {v: n for (gg, v), n in counts.items() if gg == g} for g in {g for g, _ in counts}},
        by_kind={k: dict(v) for k, v in by_kind.items()},
        slowest_case_seconds=round(worst_seconds, 3), largest_case_peak_rss_gb=round(worst_rss_kb / 2 ** 20, 3),
        examples=examples,
        platform=dict(python=platform.python_version(), machine=platform.machine()),
    )
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["totals"]))


if __name__ == "__main__":
    main()
