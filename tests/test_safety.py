"""A user's mistake never costs them a model: the source is never written, an output holding other
weights is refused, writes are atomic, and bad input is refused with a message that names the
problem before any long work starts (issue 21)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModelForImageClassification

from hf_vae_compress import ContainerError, VAECompressionConfig, cli, compress, hub, pipeline, save_pretrained
from hf_vae_compress.cli import main
from hf_vae_compress.codec import CONTAINER_NAME
from hf_vae_compress.finetune import FinetuneConfig, RUN_FILE, run_identity
from hf_vae_compress.loading import fit_state_dict, load_folder
from hf_vae_compress.models import load_model  # the loader Source.open uses
from tests.conftest import tiny_timm, tiny_vit

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--transform", "identity", "--calibration-batches", "1"]
BLIND = ["--dataset", "none", "--synthetic-images", "0", *FAST, "--target-bpw", "4"]  # no data, no synthetic images: the checks come first


def tree_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def source(timm_folder, tmp_path) -> Path:
    """A private copy of the tiny timm model, so a test that damaged it could not hide it."""
    folder = tmp_path / "source"
    shutil.copytree(timm_folder, folder)
    return folder


@pytest.fixture
def no_long_work(monkeypatch):
    """Any refusal must come before the model is calibrated: reaching Source.open fails the test."""
    def reached(*args, **kwargs):
        raise AssertionError("the long work started before the input was refused")

    monkeypatch.setattr(pipeline.Source, "open", reached)


def refused(argv: list[str], capsys, *needles: str) -> str:
    """Run the CLI, assert it exits 2 and its error names every needle; return the error."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_compress_never_writes_into_its_source(source, capsys, no_long_work, where):
    before = tree_hashes(source)
    out = {"same": source, "inside": source / "compressed", "contains": source.parent}[where]
    words = {"same": "is the source folder", "inside": "inside the source folder", "contains": "contains the source"}
    refused(["compress", str(source), str(out), *BLIND], capsys, words[where])
    assert tree_hashes(source) == before and not (source / "compressed").exists()


def test_a_symlink_to_the_source_is_the_source(source, tmp_path, capsys, no_long_work):
    link = tmp_path / "link"
    link.symlink_to(source, target_is_directory=True)
    before = tree_hashes(source)
    refused(["compress", str(source), str(link), *BLIND], capsys, "is the source folder")
    assert tree_hashes(source) == before


def test_an_output_holding_another_models_weights_needs_overwrite(source, vit_folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "other"
    shutil.copytree(vit_folder, out)
    (out / "notes.txt").write_text("mine")
    before = tree_hashes(out)
    with monkeypatch.context() as patch:
        patch.setattr(pipeline.Source, "open", lambda *a, **k: pytest.fail("long work before the refusal"))
        refused(["compress", str(source), str(out), *BLIND], capsys, "already holds model weights",
                "model.safetensors", "--overwrite")
    assert tree_hashes(out) == before

    assert main(["compress", str(source), str(out), *BLIND, "--overwrite"]) == 0
    assert not (out / "model.safetensors").exists()  # the stale weights are gone ...
    assert (out / "notes.txt").read_text() == "mine"  # ... the user's other files are kept
    assert (out / CONTAINER_NAME).is_file() and json.loads((out / "config.json").read_text())["quantization_config"]
    load_folder(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_save_pretrained_refuses_weights_unless_overwrite(source, vit_folder, tmp_path):
    compressed = compress(load_model(source), VAECompressionConfig(target_bits_per_weight=4), progress=False)
    out = tmp_path / "out"
    shutil.copytree(vit_folder, out)
    with pytest.raises(FileExistsError, match="model.safetensors"):
        save_pretrained(compressed, source, out)
    save_pretrained(compressed, source, out, overwrite=True)
    assert sorted(p.name for p in out.glob("*.safetensors")) == [CONTAINER_NAME]
    with pytest.raises(ValueError, match="source"):
        save_pretrained(compressed, source, source, overwrite=True)


KILLED_RUN = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from hf_vae_compress import hub
    from hf_vae_compress.cli import main

    write, signal_file = hub._write, Path(sys.argv[1])

    def slow_write(path, data):  # the container is on disk, the config and card are not: killed here
        write(path, data)
        if path.name == "{container}":
            signal_file.write_text("written")
            time.sleep(600)

    hub._write = slow_write
    sys.exit(main(sys.argv[2:]))
""").format(container=CONTAINER_NAME)


def _kill_mid_write(tmp_path: Path, argv: list[str]) -> None:
    signal_file = tmp_path / "container-written"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(signal_file), *argv], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not signal_file.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed: {err.decode()[-2000:]}"


def test_a_compress_killed_mid_write_leaves_no_folder_that_loads(source, tmp_path):
    out = tmp_path / "out"
    _kill_mid_write(tmp_path, ["compress", str(source), str(out), *BLIND])
    assert not out.exists()  # only a hidden staging sibling, which no loader is pointed at
    assert list(tmp_path.glob(".out.partial-*"))
    with pytest.raises(OSError):
        load_folder(out)
    live = tmp_path / f".out.partial-{os.getppid()}-x"  # a save still running elsewhere: left alone
    live.mkdir()
    assert main(["compress", str(source), str(out), *BLIND]) == 0  # the next save clears what the killed run left
    assert list(tmp_path.glob(".out.partial-*")) == [live]
    load_folder(out)


def test_a_rerun_killed_mid_write_keeps_the_previous_output(source, tmp_path):
    out = tmp_path / "out"
    assert main(["compress", str(source), str(out), *BLIND]) == 0
    before = tree_hashes(out)
    _kill_mid_write(tmp_path, ["compress", str(source), str(out), "--dataset", "none", *FAST, "--target-bpw", "2",
                               "--overwrite"])
    assert tree_hashes(out) == before  # the old container, config and card, consistent with each other
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits_per_weight"] > 3
    load_folder(out)


def _broken_config(folder: Path) -> str:
    (folder / "config.json").write_text('{"architecture": "test_resnet",')
    return str(folder / "config.json")


def _no_weights(folder: Path) -> str:
    (folder / "model.safetensors").unlink()
    return "no weights"


@pytest.mark.parametrize("damage", [_broken_config, _no_weights])
def test_a_broken_source_folder_is_named(source, tmp_path, capsys, no_long_work, damage):
    needle = damage(source)
    refused(["compress", str(source), str(tmp_path / "out"), *BLIND], capsys, needle)


def test_paths_that_are_missing_or_files_are_named(source, tmp_path, capsys, no_long_work):
    refused(["compress", "does/not/exist", str(tmp_path / "out"), *BLIND], capsys, "no such folder: does/not/exist")
    refused(["compress", str(source / "config.json"), str(tmp_path / "out"), *BLIND], capsys, "is a file")
    (tmp_path / "file").write_text("x")
    refused(["compress", str(source), str(tmp_path / "file"), *BLIND], capsys, "is a file")
    refused(["compress", str(source), "/proc/hf-vae-compress-out", *BLIND], capsys, "cannot write the output")


def test_a_hub_typo_offline_says_what_was_tried(capsys, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    err = refused(["evaluate", "vitt"], capsys, "not a local folder and not reachable on the Hub")
    assert "internet connection" not in err


def test_a_config_of_another_architecture_is_refused(vit_folder, tmp_path):
    deit = tmp_path / "deit"
    shutil.copytree(vit_folder, deit)
    config = json.loads((deit / "config.json").read_text())
    config.update(model_type="deit", architectures=["DeiTForImageClassification"])
    (deit / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not fit DeiTForImageClassification.*missing keys"):
        load_model(deit)


def test_an_already_compressed_source_is_refused(source, tmp_path, capsys, no_long_work):
    out = tmp_path / "once"
    shutil.copytree(source, out)
    (out / "model.safetensors").unlink()
    (out / CONTAINER_NAME).write_bytes(b"")  # an older folder: the container beside the plain config
    refused(["compress", str(out), str(tmp_path / "twice"), *BLIND], capsys, "already compressed",
            "compress the original")


@pytest.mark.parametrize("argv, needle", [
    (["--target-bpw", "0"], "between 0.125 and 16"), (["--target-bpw", "-1"], "between 0.125 and 16"),
    (["--target-bpw", "nan"], "not a finite number"), (["--target-bpw", "inf"], "not a finite number"),
    (["--target-bpw", "0.01"], "every weight rounds to zero"), (["--target-bpw", "64"], "between 0.125 and 16"),
    (["--max-accuracy-drop", "-1"], "at least 0 and below 100"), (["--max-accuracy-drop", "100"], "below 100"),
    (["--max-accuracy-drop", "nan"], "not a finite number"), (["--beta", "0"], "must be positive"),
])
def test_rates_and_budgets_that_mean_nothing_are_refused(source, tmp_path, capsys, no_long_work, argv, needle):
    with pytest.raises(SystemExit) as exit_:
        main(["compress", str(source), str(tmp_path / "out"), *argv])
    assert exit_.value.code == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_python_api_refuses_rates_too():
    for bad in (float("nan"), float("inf"), 0.0):
        with pytest.raises(ValueError, match="positive finite"):
            VAECompressionConfig(target_bits_per_weight=bad)
    with pytest.raises(ValueError, match="between 0.125"):
        compress(tiny_timm(), VAECompressionConfig(target_bits_per_weight=0.01), progress=False)


def test_flags_that_need_data_are_refused_up_front(source, tmp_path, capsys, no_long_work):
    out = str(tmp_path / "out")
    refused(["compress", str(source), out, "--dataset", "none", "--finetune-steps", "3", "--target-bpw", "2"], capsys,
            "--finetune-steps needs a dataset")
    refused(["compress", str(source), out, "--dataset", "none", "--validation-split", "test"], capsys,
            "--validation-split needs a dataset")


def _checkpoint(folder: Path, identity: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / RUN_FILE).write_text(json.dumps(identity))
    return folder


def test_resume_from_a_missing_or_foreign_checkpoint_is_refused_before_calibration(source, tmp_path, capsys,
                                                                                    no_long_work):
    args = ["--target-bpw", "4", "--finetune-steps", "10", *FAST]
    out = str(tmp_path / "out")
    refused(["compress", str(source), out, *args, "--resume-from", str(tmp_path / "ckpt" / "step_5")], capsys,
            "no such checkpoint folder")
    config = VAECompressionConfig(target_bits_per_weight=4.0, transform="identity", calibration_batches=1)
    tuning = FinetuneConfig(steps=10)
    other_model = _checkpoint(tmp_path / "other-model", run_identity(tiny_timm(seed=1), config.to_dict(), tuning))
    refused(["compress", str(source), out, *args, "--resume-from", str(other_model)], capsys, "another model")
    at_2 = VAECompressionConfig(target_bits_per_weight=2.0, transform="identity", calibration_batches=1)
    other_rate = _checkpoint(tmp_path / "other-rate", run_identity(load_model(source), at_2.to_dict(), tuning))
    refused(["compress", str(source), out, *args, "--resume-from", str(other_rate)], capsys, "other settings",
            "target_bits_per_weight 2.0 there, 4.0 here")
    plain = _checkpoint(tmp_path / "not-ours", {})
    (plain / RUN_FILE).unlink()
    refused(["compress", str(source), out, *args, "--resume-from", str(plain)], capsys, f"no {RUN_FILE}")


def test_push_to_an_unreachable_hub_fails_before_evaluating(tmp_path, capsys, monkeypatch, source):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "save_pretrained", lambda *a, **k: pytest.fail("evaluated before checking the Hub"))
    out = tmp_path / "out"
    assert main(["compress", str(source), str(out), *BLIND]) == 0
    start = time.perf_counter()
    refused(["push", str(out), "org/name", "--endpoint", "http://127.0.0.1:9", "--dataset", "default"], capsys,
            "not reachable", "http://127.0.0.1:9")
    assert time.perf_counter() - start < 15


def test_a_fixed_rate_over_the_budget_warns(source, small_test_set, tmp_path, capsys, monkeypatch):
    over = dict(metric="top1", split="validation", examples=100, base=0.9, compressed=0.8, drop_pt=10.0,
                drop_se_pt=3.0, budget_pt=0.5, within_budget=False)
    monkeypatch.setattr(pipeline.Source, "validation_drop", lambda self, compressed, budget=None: over)
    assert main(["compress", str(source), str(tmp_path / "out"), "--dataset", str(small_test_set), *FAST,
                 "--rounding", "nearest", "--target-bpw", "1", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["over_budget"] is True and "over the task's budget of 0.5 pt" in result["warning"]
    assert "warning: the fixed rate 1.0 bits/weight loses 10.00" in captured.err


def test_validation_split_is_passed_to_the_pipeline(source, small_test_set, tmp_path, capsys, monkeypatch):
    seen = {}

    def record(*args, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(pipeline.Source, "open", record)
    refused(["compress", str(source), str(tmp_path / "out"), "--dataset", str(small_test_set),
             "--validation-split", "test[:50%]"], capsys, "stop here")
    assert seen["validation_split"] == "test[:50%]"


def test_the_card_says_how_accuracy_was_checked(source, tmp_path):
    compressed = compress(load_model(source), VAECompressionConfig(target_bits_per_weight=4), progress=False)
    validation = dict(metric="top1", split="test[selection]", examples=5000, base=0.91, compressed=0.905, drop_pt=0.5,
                      budget_pt=0.5, selection="half of test, held out of training: the model never saw it",
                      accuracy_checked=True, warning=None)
    for checked, out in ((True, tmp_path / "checked"), (False, tmp_path / "unchecked")):
        compressed.stats["validation"] = dict(validation, accuracy_checked=checked,
                                              warning=None if checked else "the base model scores 100.00 %")
        card = (save_pretrained(compressed, source, out) / "README.md").read_text()
        section = card.split("## How accuracy was checked", 1)[1].split("##", 1)[0]
        assert "5,000 examples of the `test[selection]` split" in section
        assert "drop of 0.50 pt (budget 0.5 pt)" in section and "the model never saw it" in section
        assert ("not an accuracy check" in section) is not checked


def test_the_card_says_whether_the_weights_were_fine_tuned(source, tmp_path):
    compressed = compress(load_model(source), VAECompressionConfig(target_bits_per_weight=4), progress=False)
    post_hoc = (save_pretrained(compressed, source, tmp_path / "post-hoc") / "README.md").read_text()
    compressed.header["finetune"] = dict(steps=1200, rate_weight=0.05)
    tuned = (save_pretrained(compressed, source, tmp_path / "tuned") / "README.md").read_text()
    assert "fine-tuned" not in post_hoc
    assert "then fine-tuned for 1,200 steps on the task's training data" in tuned and "0.05 x the estimated" in tuned


def test_a_model_without_layers_to_code_gets_a_clear_error():
    with pytest.raises(ValueError, match="nothing to compress"):
        compress(torch.nn.Sequential(torch.nn.LayerNorm(8)), VAECompressionConfig(target_bits_per_weight=4),
                 progress=False)


class _Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(64, 32)
        self.body = torch.nn.Linear(32, 32)
        self.head = torch.nn.Linear(32, 64, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.relu(self.body(self.embed(ids))))


def test_tied_weights_compress_and_load_tied_again():
    torch.manual_seed(0)
    model = _Tied()
    compressed = compress(model, VAECompressionConfig(target_bits_per_weight=8), progress=False)
    decoded = compressed.decode()
    assert {"embed.weight", "head.weight"} <= set(decoded)
    fresh = _Tied()
    fresh.load_state_dict(decoded, strict=True)
    assert fresh.head.weight.data_ptr() == fresh.embed.weight.data_ptr()  # still tied
    assert torch.allclose(fresh.embed.weight, model.embed.weight, atol=0.05)


def test_a_truncated_container_through_from_pretrained_names_the_file(vit_folder, tmp_path):
    compressed = compress(tiny_vit(), VAECompressionConfig(target_bits_per_weight=4.0, rounding="nearest"),
                          progress=False)
    out = tmp_path / "out"
    save_pretrained(compressed, vit_folder, out)
    container = out / CONTAINER_NAME
    container.write_bytes(container.read_bytes()[:1000])
    with pytest.raises(ContainerError, match=f"{container}.*truncated or corrupt"):
        AutoModelForImageClassification.from_pretrained(out)


def test_an_integer_buffer_decoded_as_floats_is_refused_not_cast():
    """A version-1 header whose integer buffer's dtype name was changed to a float of the same width
    decodes the same bytes (its hash covers bytes, not dtypes): the loader must refuse it, not cast
    garbage into the model's counter (found by the fuzz benchmark)."""
    expected = {"bn.num_batches_tracked": torch.zeros((), dtype=torch.int64, device="meta"),
                "bn.weight": torch.zeros(3, device="meta")}
    counter = torch.tensor(5, dtype=torch.int64)
    decoded = {"bn.num_batches_tracked": counter.view(torch.float64), "bn.weight": torch.ones(3, dtype=torch.float16)}
    with pytest.raises(RuntimeError, match="num_batches_tracked.*float64.*int64"):
        fit_state_dict(decoded, expected, "model")
    decoded["bn.num_batches_tracked"] = counter  # the float weight is still cast to the model's dtype
    assert fit_state_dict(decoded, expected, "model")["bn.weight"].dtype == torch.float32


def test_a_latent_quantizer_without_latents_is_refused_up_front(source, tmp_path, capsys, no_long_work):
    out = str(tmp_path / "out")
    for transform in (["--transform", "identity"], [], ["--transform", "vae"]):  # [] is the default, identity
        refused(["compress", str(source), out, *BLIND, *transform, "--latent-quantizer", "d4"], capsys,
                "--latent-quantizer d4", "--transform vae-int or auto")
    with pytest.raises(SystemExit) as exit_:
        main(["compress", str(source), out, *BLIND, "--latent-quantizer", "a2"])
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_latent_quantizer_reaches_the_container(source, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["compress", str(source), str(out), "--dataset", "none", "--synthetic-images", "0", "--target-bpw", "4",
            "--calibration-batches", "1", "--transform", "vae-int", "--train-steps", "20", "--latent-quantizer", "e8",
            "--json"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["latent_quantizer"] == "e8"


def test_a_rate_resolution_needs_a_rate_search_and_reaches_it(source, tmp_path, capsys, no_long_work, monkeypatch):
    out = str(tmp_path / "out")
    refused(["compress", str(source), out, *BLIND, "--rate-resolution", "0.1"], capsys, "--rate-resolution",
            "--target-bpw")
    with pytest.raises(SystemExit) as exit_:
        main(["compress", str(source), out, "--rate-resolution", "-0.1"])
    assert exit_.value.code == 2 and "at least 0" in capsys.readouterr().err
    seen = {}

    def search(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop after the search was called")

    monkeypatch.setattr(cli, "search_smallest", search)
    monkeypatch.setattr(pipeline.Source, "open", lambda *a, **k: types.SimpleNamespace(
        task=types.SimpleNamespace(budget_pt=0.5, budget_share=1.0), stage_seconds={}))
    with pytest.raises(RuntimeError, match="stop after"):
        main(["compress", str(source), out, *FAST, "--rate-resolution", "0.125"])
    assert seen["resolution"] == 0.125
    assert not (tmp_path / "out").exists()
