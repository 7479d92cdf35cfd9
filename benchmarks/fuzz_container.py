"""Fuzz the container reader with mutated real containers (``make fuzz``).

A container fetched from the Hub is untrusted input. This mutates real containers and decodes each
mutant in a worker process under limits. The sources are

* a fresh container of every reference model, written by the current code on every run (identity
  transform at a fixed 2 bits/weight, output-aware rounding and both corrections from two
  calibration batches, no rate search), so every field the writer puts in a header today is
  fuzzed: containers kept from an earlier run would lack the newer ones;
* the committed version-1 fixtures (``tests/data/v1/*.safetensors``), read from a temporary copy:
  every artifact published before version 2 is read by the frozen v1 reader.

Each mutant is classified against the clean container's own outcome:

* ``refused``: a clear :class:`ContainerError` (``IntegrityError`` included), or decoded weights
  that the loaders' own check refuses (:func:`~hf_vae_compress.loading.fit_state_dict` against the
  clean weights' names, shapes and dtypes; for version 1, which cannot verify names, their order):
  what a user who loads the file into its model is told;
* ``harmless``: decoded bit-identical to the clean container, or refused exactly as the clean
  container is on this machine (a VAE container whose float decoder cannot be verified here);
* ``silently_wrong``: decoded without an error to weights that differ (or decoded at all where the
  clean container cannot be): the failure that must never happen;
* ``other_exception``: any exception that is not one of the library's documented errors;
* ``over_limit``: more than ``--seconds`` per case, or more than ``--max-rss-gb`` of peak memory.

Byte-level mutations work on the file: bit flips anywhere and in the safetensors header,
truncation at every region boundary and at random points, random runs, digits edited in the
safetensors header (offsets and shapes), swapped blocks, appended bytes. Structure-aware mutations
decode the container's own JSON header, change it and re-encode a well-formed file: one field set
to an absurd value or dropped (sweeping the header's distinct fields in turn, ``tensors[*].lo[*]``
as often as ``format_version``, so that every field of every source is mutated; the results count
them), tensor names swapped, duplicated or made non-strings, format versions, dtype names and
transform sizes. Bombs put a zlib header that inflates to gigabytes, and foreign files are plain safetensors
checkpoints, with and without our metadata.

Writes ``benchmarks/results/fuzz.json`` (totals per source, per kind and per verdict, and example
mutations of every failure).
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import platform
import random
import resource
import shutil
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

import torch

from hf_vae_compress.codec import CompressedModel, ContainerError, VAECompressionConfig, compress, folder_container
from hf_vae_compress.hub import save_pretrained
from hf_vae_compress.loading import fit_state_dict
from hf_vae_compress.models import load_model
from hf_vae_compress.tasks import task_for

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ["fmnist-resnet18", "fmnist-mobilenetv3", "fmnist-vit", "fmnist-rtdetr"]
V1_FIXTURES = ROOT / "tests" / "data" / "v1"
# Fresh containers: every header field today's writer can set, cheaply (a format test, not a quality one).
FRESH = VAECompressionConfig(target_bits_per_weight=2.0, transform="identity", calibration_batches=2,
                             rounding="output_aware", correct_biases=True, correct_norms=True)
BYTE_KINDS = ["bit_flip", "header_bit_flip", "truncate_boundary", "truncate_random", "random_run", "digit_edit",
              "swap_blocks", "append"]
STRUCTURE_KINDS = ["field_value", "swap_names", "duplicate_name", "name_type", "format_version", "dtype_name",
                   "transform_size", "drop_field"]
OTHER_KINDS = ["header_bomb", "foreign"]
ABSURD = [-1, 0, 1, 2 ** 31, 2 ** 40, 2 ** 63, -(2 ** 63), 1.5, -0.0, 1e308, "x", "", None, True, [], {}, [1, 2],
          {"a": 1}, "NaN"]
NON_STRINGS = [0, -1, 1.5, None, True, [], ["x"], {}, {"a": 1}]
EXAMPLES_PER_CELL = 3  # example mutations kept per (source, kind, failing verdict)
FAILURES = ("silently_wrong", "other_exception", "over_limit")


# ---------------------------------------------------------------------------------------------
# Sources: fresh containers of the reference models, and copies of the committed v1 fixtures


def fresh_container(name: str, work: Path) -> bytes:
    """The container file ``save_pretrained`` writes for a reference model at ``FRESH``'s rate."""
    source = ROOT / "reference_models" / name
    model = load_model(source)
    batches, loss_fn = task_for(model).calibration(model, FRESH.calibration_batches)
    compressed = compress(model, FRESH, calibration_data=batches, loss_fn=loss_fn, progress=False)
    return folder_container(save_pretrained(compressed, source, work / name)).read_bytes()


def v1_fixtures(work: Path) -> dict[str, bytes]:
    """The committed version-1 fixtures, copied first: mutants are written elsewhere, never into tests/."""
    copies = work / "v1"
    copies.mkdir()
    found = {}
    for path in sorted(V1_FIXTURES.glob("*.safetensors")):
        found[f"v1/{path.name.split('.')[0]}"] = Path(shutil.copy(path, copies / path.name)).read_bytes()
    return found


def sources(models: list[str], with_v1: bool, work: Path) -> dict[str, bytes]:
    found = {}
    for name in models:
        start = time.perf_counter()
        found[name] = fresh_container(name, work)
        print(f"wrote a fresh container of {name} ({len(found[name]):,} bytes) in "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    return {**found, **(v1_fixtures(work) if with_v1 else {})}


# ---------------------------------------------------------------------------------------------
# Containers and their regions


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
# Mutations: each takes the clean bytes and a seeded Random and returns the mutant and what it did


def mutate_bytes(kind: str, data: bytes, rng: random.Random) -> tuple[bytes, str]:
    n, bounds = regions(data)
    out = bytearray(data)
    if kind in ("bit_flip", "header_bit_flip"):
        at, bit = (rng.randrange(len(out)) if kind == "bit_flip" else 8 + rng.randrange(n)), rng.randrange(8)
        out[at] ^= 1 << bit
        done = f"byte {at} bit {bit}"
    elif kind == "truncate_boundary":
        out = out[: max(0, rng.choice(bounds) + rng.choice([-1, 0, 1]))]
        done = f"to {len(out)} of {len(data)} bytes"
    elif kind == "truncate_random":
        out = out[: rng.randrange(len(out))]
        done = f"to {len(out)} of {len(data)} bytes"
    elif kind == "random_run":
        at, length = rng.randrange(len(out)), rng.randint(1, 64)
        out[at: at + length] = bytes(rng.randrange(256) for _ in range(length))[: len(out) - at]
        done = f"{length} random bytes at {at}"
    elif kind == "digit_edit":
        at = rng.choice([i for i in range(8, 8 + n) if chr(out[i]).isdigit()])
        old, out[at] = chr(out[at]), ord(rng.choice("0123456789".replace(chr(out[at]), "")))
        done = f"safetensors header byte {at}: {old} -> {chr(out[at])}"
    elif kind == "swap_blocks":
        length = rng.randint(1, max(1, len(out) // 16))
        a, b = sorted(rng.sample(range(len(out) - length), 2))
        if b - a >= length:
            out[a: a + length], out[b: b + length] = out[b: b + length], out[a: a + length]
        done = f"{length} bytes at {a} and {b}"
    else:  # append
        extra = rng.randint(1, 4096)
        out += bytes(rng.randrange(256) for _ in range(extra))
        done = f"{extra} random bytes"
    return bytes(out), done


def _paths(value, prefix=()):
    """Every path into a JSON value (dict keys and list indices), leaves and containers alike."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:64]):
            yield from _paths(v, (*prefix, i))


def field_of(path: tuple) -> str:
    """The field a path names, list indices left out: ``tensors[*].lo[*]`` for ``("tensors", 3, "lo", 0)``."""
    return "".join(f".{key}" if isinstance(key, str) else "[*]" for key in path).lstrip(".")


def header_fields(header: dict, droppable: bool = False) -> dict[str, list[tuple]]:
    """The concrete paths of every distinct field of a header (only dict keys when ``droppable``)."""
    fields: dict[str, list[tuple]] = {}
    for path in _paths(header):
        if path and (not droppable or isinstance(path[-1], str)):
            fields.setdefault(field_of(path), []).append(path)
    return fields


def _parent(value, path: tuple):
    for key in path[:-1]:
        value = value[key]
    return value


def mutate_structure(kind: str, data: bytes, rng: random.Random, turn: int) -> tuple[bytes, str]:
    """``turn``: how many mutations of this kind the source had before; field mutations sweep the
    header's fields in turn, so a source's every field is mutated once there are as many cases."""
    metadata, header, entries = split(data)
    tensors = header.get("tensors", [])
    if kind in ("field_value", "drop_field"):
        fields = header_fields(header, droppable=kind == "drop_field")
        field = sorted(fields)[turn % len(fields)]
        path = rng.choice(fields[field])
        if kind == "drop_field":
            del _parent(header, path)[path[-1]]
            done = f"{field} ({path}) removed"
        else:
            value = rng.choice(ABSURD)
            _parent(header, path)[path[-1]] = value
            done = f"{field} ({path}) = {value!r}"
    elif kind == "swap_names":
        same = {}
        for e in tensors:
            same.setdefault((tuple(e["shape"]), e["dtype"], e["codec"]), []).append(e)
        groups = [g for g in same.values() if len(g) > 1] or [tensors]
        a, b = rng.sample(rng.choice(groups), 2)
        a["name"], b["name"] = b["name"], a["name"]
        done = f"{a['name']!r} <-> {b['name']!r}"
    elif kind == "duplicate_name":
        a, b = rng.sample(tensors, 2)
        done = f"{a['name']!r} renamed {b['name']!r}"
        a["name"] = b["name"]
    elif kind == "name_type":
        entry, value = rng.choice(tensors), rng.choice(NON_STRINGS)
        done = f"{entry['name']!r} renamed {value!r}"
        entry["name"] = value
    elif kind == "format_version":
        header["format_version"] = rng.choice([0, 1, 2, 3, -2, "1", "2", 1.0, 2.0, True, None, 2 ** 40])
        done = f"format_version = {header['format_version']!r}"
        if rng.random() < 0.5:
            metadata = {"format": f"hf-vae-compress/{rng.choice(['1', '2', '3', '', 'x', '99999999999999999999'])}"}
            done += f", metadata {metadata}"
    elif kind == "dtype_name":
        entry = rng.choice(tensors)
        entry["dtype"] = rng.choice(["float64", "complex64", "int8", "bool", "bogus", "torch.float32", "", "__class__",
                                     "float8_e4m3fn"])
        done = f"{entry['name']!r} dtype = {entry['dtype']!r}"
    else:  # transform_size
        key = rng.choice(["chunk_size", "hidden_size"])
        header["transform"][key] = rng.choice([0, -1, 1, 2, 8, 10, 2 ** 20, 2 ** 40, 1.5, "9"])
        done = f"transform.{key} = {header['transform'][key]!r}"
    return join(metadata, header, entries), done


@functools.lru_cache(maxsize=None)
def zlib_bomb(size: int) -> bytes:
    """``size`` bytes of JSON whitespace, zlib-compressed (about a thousandth of the size)."""
    bomb = zlib.compressobj(9)
    chunk = b" " * (1 << 24)
    return b"".join(bomb.compress(chunk) for _ in range(size >> 24)) + bomb.flush()


def mutate_other(kind: str, data: bytes, rng: random.Random, foreign: bytes) -> tuple[bytes, str]:
    metadata, _, entries = split(data)
    if kind == "header_bomb":
        size = rng.choice([1 << 28, 1 << 30, 1 << 32])
        return join(metadata, zlib_bomb(size), entries), f"header inflating to {size:,} bytes"
    if rng.random() < 0.5:
        return foreign, "a plain checkpoint named like a container"
    m_n = struct.unpack("<Q", foreign[:8])[0]
    table = json.loads(foreign[8: 8 + m_n])
    table["__metadata__"] = {"format": "hf-vae-compress/2"}
    entries = {k: (v["dtype"], v["shape"], foreign[8 + m_n + v["data_offsets"][0]: 8 + m_n + v["data_offsets"][1]])
               for k, v in table.items() if k != "__metadata__"}
    header = {"format": "hf-vae-compress", "format_version": 2, "tensors": []}
    return join(table["__metadata__"], header, entries), "a plain checkpoint that claims to be ours"


def make_case(kind: str, data: bytes, rng: random.Random, foreign: bytes, turn: int) -> tuple[bytes, str]:
    if kind in BYTE_KINDS:
        return mutate_bytes(kind, data, rng)
    if kind in STRUCTURE_KINDS:
        return mutate_structure(kind, data, rng, turn)
    return mutate_other(kind, data, rng, foreign)


# ---------------------------------------------------------------------------------------------
# The worker: decodes mutants under an address-space limit and reports one verdict per case


def _decode(path: Path, clean: tuple[str, object] | None = None) -> tuple[str, object]:
    """("weights", state dict) or ("refused", the error as text).

    Given the clean container's outcome, decoded weights are also fitted to the clean weights'
    names, shapes and dtypes by :func:`~hf_vae_compress.loading.fit_state_dict`, as every loader
    fits them to the model (for version 1, in the writer's order): what no loader would load is
    refused, as it is for a user.
    """
    try:
        compressed = CompressedModel.load(path)
        decoded = compressed.decode()
    except ContainerError as err:
        return "refused", f"{type(err).__name__}: {err}"
    if clean is not None and clean[0] == "weights":
        expected = {k: v.to("meta") for k, v in clean[1].items()}
        try:
            fit_state_dict(decoded, expected, path, names_verified=compressed.names_verified)
        except (ContainerError, RuntimeError) as err:  # the loaders' refusals: missing, unexpected, misshaped, misordered
            return "refused", f"at load: {type(err).__name__}: {err}"
    return "weights", decoded


def _judge(outcome: tuple[str, object], clean: tuple[str, object]) -> tuple[str, str]:
    """A decoded mutant's verdict against the clean container's outcome on this machine."""
    kind, value = outcome
    if kind == "refused":
        return ("harmless", "") if clean == outcome else ("refused", value[:200])
    if clean[0] == "refused":
        return "silently_wrong", f"decoded, where the clean container is refused here ({clean[1][:100]})"
    reference = clean[1]
    differ = sorted(set(value) ^ set(reference), key=repr) or [  # a mutant's names need not be strings
        k for k in reference if value[k].dtype != reference[k].dtype or not torch.equal(value[k], reference[k])]
    return ("silently_wrong", f"decoded to other weights: {differ[:3]}") if differ else ("harmless", "")


def _worker(conn, address_space_gb: float) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (int(address_space_gb * 2 ** 30),) * 2)
    torch.set_num_threads(1)
    references: dict[str, tuple] = {}
    scratch = Path(tempfile.mkdtemp(prefix="fuzz-"))
    while True:
        message = conn.recv()
        if message is None:
            shutil.rmtree(scratch)
            return
        source, clean, mutant = message
        path = scratch / "case.safetensors"
        if source not in references:
            path.write_bytes(clean)
            references[source] = _decode(path)
        path.write_bytes(mutant)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        try:
            verdict, detail = _judge(_decode(path, references[source]), references[source])
        except MemoryError as err:
            verdict, detail = "over_limit", f"MemoryError: {err}"[:200]
        except Exception as err:  # noqa: BLE001 - classifying every exception is the point
            verdict, detail = "other_exception", f"{type(err).__name__}: {err}"[:300]
        seconds = time.perf_counter() - start
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        conn.send((verdict, detail, seconds, peak_kb if peak_kb > before else 0))


class Decoder:
    """A worker process, spawned (never forked from a parent whose thread pools compressed models);
    restarted after a case that hangs or raises its memory peak past the limit."""

    def __init__(self, address_space_gb: float):
        self.address_space_gb = address_space_gb
        self._start()

    def _start(self) -> None:
        context = mp.get_context("spawn")
        self.conn, child = context.Pipe()
        self.proc = context.Process(target=_worker, args=(child, self.address_space_gb), daemon=True)
        self.proc.start()

    def restart(self) -> None:
        self.proc.kill()
        self.proc.join()
        self._start()

    def run(self, source: str, clean: bytes, mutant: bytes, seconds: float) -> tuple[str, str, float, int]:
        self.conn.send((source, clean, mutant))
        wait = max(seconds * 3, 60)  # the first case of a source also decodes the clean container
        if not self.conn.poll(wait):  # a hang: the worker is killed, the case is over the limit
            self.restart()
            return "over_limit", f"no answer within {wait:.0f} s", float("inf"), 0
        try:
            return self.conn.recv()
        except EOFError:  # the worker died (e.g. killed by the OS)
            self.restart()
            return "other_exception", "the decoding process died", 0.0, 0

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join()


# ---------------------------------------------------------------------------------------------
# The run


def draw_kind(rng: random.Random, structure_share: float) -> str:
    roll = rng.random()
    if roll < structure_share:
        return rng.choice(STRUCTURE_KINDS)
    if roll < structure_share + 0.01:
        return rng.choice(OTHER_KINDS)
    return rng.choice(BYTE_KINDS)


def coverage(containers: dict[str, bytes], mutated: dict[str, set]) -> dict[str, dict]:
    """Per source: the distinct fields of its JSON header, and how many a field mutation touched."""
    result = {}
    for source, data in containers.items():
        fields = set(header_fields(split(data)[1]))
        result[source] = dict(fields=len(fields), mutated=len(fields & mutated.get(source, set())),
                              never_mutated=sorted(fields - mutated.get(source, set())))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=MODELS, help="reference models to write fresh containers of")
    parser.add_argument("--no-v1", action="store_true", help="leave out the committed v1 fixtures")
    parser.add_argument("--cases", type=int, default=10_500, help="total cases over all sources")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--structure-share", type=float, default=0.4)
    parser.add_argument("--seconds", type=float, default=10.0, help="time limit per case")
    parser.add_argument("--max-rss-gb", type=float, default=2.0, help="peak memory limit per case")
    parser.add_argument("--address-space-gb", type=float, default=8.0, help="RLIMIT_AS of the decoding process")
    parser.add_argument("--output", type=Path, default=RESULTS / "fuzz.json")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="fuzz-sources-") as work:
        containers = sources(args.models, not args.no_v1, Path(work))
    names = list(containers)
    foreign = (ROOT / "reference_models" / "fmnist-vit" / "model.safetensors").read_bytes()
    rng = random.Random(args.seed)
    decoder = Decoder(args.address_space_gb)
    counts: Counter = Counter()  # (source, group, kind, verdict)
    examples: list[dict] = []
    kept: Counter = Counter()
    turns: Counter = Counter()  # (source, kind): cases drawn so far
    mutated: dict[str, set] = {}
    worst_seconds, worst_rss_kb = 0.0, 0
    start = time.perf_counter()
    for case in range(args.cases):
        source = names[case % len(names)]
        kind = draw_kind(rng, args.structure_share)
        mutant, mutation = make_case(kind, containers[source], random.Random(rng.random()), foreign,
                                     turns[(source, kind)])
        turns[(source, kind)] += 1
        if kind in ("field_value", "drop_field"):
            mutated.setdefault(source, set()).add(mutation.split(" ", 1)[0])
        verdict, detail, seconds, peak_kb = decoder.run(source, containers[source], mutant, args.seconds)
        if verdict not in ("over_limit", "other_exception") and (seconds > args.seconds
                                                                 or peak_kb > args.max_rss_gb * 2 ** 20):
            verdict, detail = "over_limit", f"{seconds:.1f} s, peak {peak_kb / 2 ** 20:.2f} GB; was {verdict}"
        if peak_kb > args.max_rss_gb * 2 ** 20:
            decoder.restart()  # ru_maxrss only grows: a fresh process measures the next case's peak
        worst_seconds = max(worst_seconds, seconds if seconds != float("inf") else args.seconds * 3)
        worst_rss_kb = max(worst_rss_kb, peak_kb)
        group = "structure" if kind in STRUCTURE_KINDS else "byte" if kind in BYTE_KINDS else kind
        counts[(source, group, kind, verdict)] += 1
        if verdict in FAILURES and kept[(source, kind, verdict)] < EXAMPLES_PER_CELL:
            kept[(source, kind, verdict)] += 1
            examples.append(dict(case=case, source=source, kind=kind, verdict=verdict, mutation=mutation,
                                 detail=detail))
        if case % 500 == 0:
            failures = {v: n for v in FAILURES if (n := sum(c for k, c in counts.items() if k[3] == v))}
            print(f"{case}/{args.cases} cases, {time.perf_counter() - start:.0f} s, failures so far: {failures}",
                  file=sys.stderr)
    decoder.close()

    def tally(keep) -> dict:
        out: Counter = Counter()
        for key, n in counts.items():
            if keep(key):
                out[key[3]] += n
        return dict(out)

    result = dict(
        cases=args.cases, seed=args.seed, seconds=round(time.perf_counter() - start, 1),
        sources={s: dict(bytes=len(containers[s]),
                         written="committed v1 fixture (tests/data/v1)" if s.startswith("v1/") else
                         f"fresh from the current code: {FRESH.to_dict()}") for s in names},
        limits=dict(seconds_per_case=args.seconds, max_rss_gb=args.max_rss_gb, address_space_gb=args.address_space_gb),
        totals=tally(lambda key: True),
        by_source={s: dict(totals=tally(lambda key: key[0] == s),
                           by_kind={k: tally(lambda key: key[0] == s and key[2] == k)
                                    for k in sorted({key[2] for key in counts if key[0] == s})}) for s in names},
        by_group={g: tally(lambda key: key[1] == g) for g in sorted({key[1] for key in counts})},
        by_kind={k: tally(lambda key: key[2] == k) for k in sorted({key[2] for key in counts})},
        header_fields=coverage(containers, mutated),
        slowest_case_seconds=round(worst_seconds, 3), largest_case_peak_rss_gb=round(worst_rss_kb / 2 ** 20, 3),
        examples=examples,
        platform=dict(python=platform.python_version(), machine=platform.machine()),
    )
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(dict(totals=result["totals"], by_source={s: r["totals"] for s, r in result["by_source"].items()})))


if __name__ == "__main__":
    main()
