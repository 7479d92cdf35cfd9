"""The package's stages in dependency order: a module imports only from its own or earlier stages.

Plain data, read by ``tests/test_stages.py`` (which parses every module's imports) and drawn in
``ARCHITECTURE.md``. The codec's stages follow the pipeline (fold -> select -> chunk -> transform ->
quantize -> entropy-code -> container); the format's primitives come first because every stage
agrees on them (the chunk geometry, the value grids, the coder), and the readers that decode a
whole container come after the transform whose decoder they run. Everything outside ``codec/``
comes after it: the codec knows nothing of tasks, models, the Hub or the CLI.

Names are module paths relative to ``hf_vae_compress`` ("" is the package itself; a package's
name stands for its ``__init__``). A new module must be placed here, or the test fails.
"""

from __future__ import annotations

STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("format primitives", (
        "codec.format", "codec.format.limits", "codec.format.framing",
        "codec.format.integrity", "codec.format.layout", "codec.format.grid", "codec.format.identity",
        "codec.format.linear",
        "codec.format.streams",
    )),
    # lattice.py is pure arithmetic with no package imports: the config validates its names, and the
    # transform and output-aware rounding use its closest-point decoders
    ("config", ("codec.lattice", "codec.config")),
    ("fold", ("codec.folding",)),
    ("select", ("codec.select",)),
    ("chunk", ("codec.chunking",)),
    ("transform", ("codec.quantize", "codec.transform", "codec.fit")),
    ("quantize", ("codec.importance", "codec.output_aware", "codec.calibration", "codec.correction",
                  "codec.rate", "codec.latents")),
    ("container", ("codec.format.fields", "codec.format.v1", "codec.format.v2", "codec.format.registry", "codec.compressed")),
    ("compress", ("codec.compress", "codec.reparam", "codec")),
    ("tasks", ("data", "evaluate", "detection", "synthetic", "tasks")),
    ("models", ("models", "loading")),
    ("integrations", ("integrations", "integrations.quantization_config", "integrations.transformers_quantizer",
                      "integrations.timm", "integrations.remote_code", "integrations.remote_code.modeling_hf_vae_compress")),
    ("publish", ("hub",)),
    ("pipeline", ("finetune", "sequential", "pipeline", "search")),
    ("entry points", ("cli", "__main__", "", "stages")),
    ("testing", ("testing", "testing.hub_server")),
)

# Imports of a package module inside a function, each with the reason it is not at module level
# (never to dodge a cycle: a cycle is fixed by moving code to the right stage).
LAZY_IMPORTS: dict[tuple[str, str], str] = {
    ("integrations", "integrations.transformers_quantizer"):
        "it imports transformers' internal quantizer API, which other transformers releases may lack; the "
        "remote-code shim imports this package and must work without it",
}


def stage_of(module: str) -> int:
    """The index of ``module``'s stage in :data:`STAGES` (KeyError for a module not placed)."""
    for index, (_, modules) in enumerate(STAGES):
        if module in modules:
            return index
    raise KeyError(f"module {module!r} is not placed in hf_vae_compress.stages.STAGES")
