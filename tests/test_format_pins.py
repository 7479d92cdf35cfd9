"""Every committed container decodes to the bits it decoded to when the pins were recorded.

``data/decode_digests.json`` holds, per committed headline artifact and test fixture whose decode
is exact on every machine (identity transform), the digest of every decoded tensor's name, dtype,
shape and bytes: the fixtures' recorded with the code at ``recorded_at``, before the format moved
into ``codec/format/``; the artifacts' at ``artifacts_recorded_at``, when they were last rewritten
(a regenerated artifact is re-pinned, a fixture never). A refactor of the readers that changes one
decoded bit fails here. The one VAE
fixture's float decoder is machine-dependent: its symbols and scales are pinned in
``test_container_v1.py`` instead.
"""

import json
from pathlib import Path

import pytest

from tests.decode_probe import probe

ROOT = Path(__file__).resolve().parent.parent
PINS = json.loads((ROOT / "tests" / "data" / "decode_digests.json").read_text())["digests"]


def test_every_committed_artifact_is_pinned():
    artifacts = {f"benchmarks/results/artifacts/{p.name}" for p in (ROOT / "benchmarks/results/artifacts").iterdir()}
    assert artifacts <= set(PINS), f"committed artifacts without a pinned digest: {sorted(artifacts - set(PINS))}"


@pytest.mark.parametrize("path", sorted(PINS))
def test_decodes_to_pinned_digest(path):
    result = probe(str(ROOT / path))
    assert result["status"] == "ok", result
    assert result["digest"] == PINS[path]
