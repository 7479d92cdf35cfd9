"""Fine-tuning and the distributed (accelerate) paths, run as real subprocesses on CPU."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hf_vae_compress import CompressedModel, VAECompressionConfig, compress
from hf_vae_compress.cli import main
from hf_vae_compress.codec import CONTAINER_NAME, FitConfig
from hf_vae_compress.finetune import FinetuneConfig, finetune, lr_factor
from hf_vae_compress.models import load_model
from hf_vae_compress.search import search_smallest
from tests.conftest import tiny_timm

COMPRESS = ["--target-bpw", "3", "--train-steps", "40", "--json"]


def _env() -> dict:
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    env.pop("WORLD_SIZE", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _relative_error(reference: dict, decoded: dict) -> float:
    num = sum(((reference[k].float() - decoded[k].float()) ** 2).sum() for k in reference if reference[k].is_floating_point())
    den = sum((reference[k].float() ** 2).sum() for k in reference if reference[k].is_floating_point())
    return float(num / den)


def test_finetune_lowers_the_task_loss_at_a_rate_cost_it_controls():
    model = tiny_timm()
    x = torch.randn(512, 1, 28, 28)
    with torch.no_grad():
        y = model(x).argmax(-1)  # labels the original model gets right: fine-tuning should recover them
    # 0.5 bits/weight: format v2 spends less on side information, so at 0.8 nothing is left to recover
    compressed = compress(model, VAECompressionConfig(target_bits_per_weight=0.5, fit=FitConfig(train_steps=40)), progress=False)

    def agreement(c: CompressedModel) -> float:
        student = tiny_timm()
        student.load_state_dict(c.decode())
        with torch.no_grad():
            return float((student(x).argmax(-1) == y).float().mean())

    tuned = finetune(compressed, model, (x, y), FinetuneConfig(steps=150, batch_size=64, rate_weight=0.01),
                     progress=False)
    assert agreement(tuned) > agreement(compressed)
    assert tuned.batchnorm_folded == compressed.batchnorm_folded > 0  # it tunes the folded vectors it started from
    squeezed = finetune(compressed, model, (x, y), FinetuneConfig(steps=150, batch_size=64, rate_weight=20.0),
                        progress=False)
    assert squeezed.report()["total_bytes"] < tuned.report()["total_bytes"]


def test_the_cosine_schedule_falls_to_zero_at_the_last_step_and_an_unknown_one_is_refused_up_front():
    cosine, constant = lr_factor("cosine", 300), lr_factor("constant", 300)
    assert [cosine(s) for s in (0, 150, 300)] == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)
    assert all(cosine(s) >= cosine(s + 1) for s in range(300))
    assert {constant(s) for s in (0, 150, 300)} == {1.0}
    with pytest.raises(ValueError, match="unknown fine-tuning schedule 'linear'"):
        FinetuneConfig(schedule="linear")


def test_two_cpu_processes_match_one(timm_folder, small_test_set, tmp_path):
    """The same job under `accelerate launch` with 1 and 2 gloo processes (VAE fit sharded,
    fine-tuning data-parallel). Tolerance: sizes within 3 %, weight errors within 15 % of each other."""
    outs = {}
    for n in (1, 2):
        out = tmp_path / f"out{n}"
        launch = ["--num_processes", "1"] if n == 1 else [
            "--multi_gpu", "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port())]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, "-m", "hf_vae_compress", "compress",
               str(timm_folder), str(out), "--dataset", str(small_test_set), "--finetune-steps", "6", *COMPRESS]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(proc.stdout[proc.stdout.index("{"):])
        assert result["finetune"]["processes"] == n
        outs[n] = (result["total_bytes"], CompressedModel.load(out).decode())
    original = load_model(timm_folder).state_dict()
    (bytes1, sd1), (bytes2, sd2) = outs[1], outs[2]
    assert abs(bytes1 - bytes2) / bytes1 < 0.03
    err1, err2 = _relative_error(original, sd1), _relative_error(original, sd2)
    assert abs(err1 - err2) / err1 < 0.15, (err1, err2)


def _latest_checkpoint(folder: Path) -> Path:
    return max(folder.glob("step_*[0-9]"), key=lambda p: int(p.name.split("_")[1]))


def test_killed_run_resumes_to_the_uninterrupted_bytes(timm_folder, small_test_set, tmp_path):
    """SIGKILL mid-fine-tuning, resume from the last complete checkpoint: the container is
    byte-identical to an uninterrupted run with the same seed (wall-clock facts stay out of it)."""
    def command(name: str) -> list[str]:
        return [sys.executable, "-m", "hf_vae_compress", "compress", str(timm_folder), str(tmp_path / name),
                "--dataset", str(small_test_set), "--finetune-steps", "60", "--checkpoint-every", "5",
                "--checkpoint-dir", str(tmp_path / f"{name}-ckpt"), *COMPRESS]

    checkpoints = tmp_path / "killed-ckpt"
    proc = subprocess.Popen(command("killed"), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.time() + 240
    while not (checkpoints / "step_10").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed").exists() or not any((tmp_path / "killed").glob("*.vaec.safetensors"))
    resume_from = _latest_checkpoint(checkpoints)
    resumed = subprocess.run([*command("killed"), "--resume-from", str(resume_from)], capture_output=True,
                             text=True, env=_env(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout)["resumed_from"] == str(resume_from)
    whole = subprocess.run(command("whole"), capture_output=True, text=True, env=_env(), timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert (tmp_path / "killed" / CONTAINER_NAME).read_bytes() == (tmp_path / "whole" / CONTAINER_NAME).read_bytes()
    model = load_model(timm_folder)
    model.load_state_dict(CompressedModel.load(tmp_path / "killed").decode(), strict=True)


def test_finetuning_without_data_is_refused(timm_folder, tmp_path, capsys):
    assert main(["compress", str(timm_folder), str(tmp_path), "--dataset", "none", "--finetune-steps", "3"]) == 2
    assert "needs a dataset" in capsys.readouterr().err


def test_rate_search_keeps_the_smallest_container_within_the_budget(timm_folder, small_test_set, tmp_path):
    config = VAECompressionConfig(transform="identity")
    result = search_smallest(str(timm_folder), tmp_path / "any", 100.0, str(small_test_set), config,
                             probes=3, progress=False)
    log = result.probes
    assert len(log) == 3 and all(p["validation_drop_pt"] <= 100 for p in log)
    assert len(result.compressed.to_bytes()) == min(p["bytes"] for p in log)
    assert result.validation["drop_pt"] <= 100 and result.validation["split"] == "validation"
    assert log[0]["target_bits_per_weight"] > log[1]["target_bits_per_weight"] > log[2]["target_bits_per_weight"]
    assert CompressedModel.load(tmp_path / "any").report()["total_bytes"] == result.compressed.report()["total_bytes"]
    result = search_smallest(str(timm_folder), tmp_path / "none", -100.0, str(small_test_set), config,
                             probes=2, progress=False)
    log = result.probes
    assert result.compressed is None and log[0]["target_bits_per_weight"] < log[1]["target_bits_per_weight"]
    assert not (tmp_path / "none").exists()
