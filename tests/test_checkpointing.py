"""SIGINT/SIGTERM during ``polysae-lens train`` (a real signal, in a subprocess)
leaves a consistent checkpoint that resumes to the uninterrupted result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from polysae_lens import orthogonality_error

from .lm_fixtures import save_tiny_hf_model, write_text_dataset
from .test_cli import OFFLINE_ENV, TINY_RUN

TOKENS = 6400  # 200 steps of 32 tokens; the signal comes after step 100


@pytest.fixture(scope="module")
def run_flags(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("local")
    tiny = [a for a in TINY_RUN if a not in ("--model_name", "tiny-offline")]
    return [
        *tiny,
        "--model_class_name", "AutoModelForCausalLM",
        "--model_name", str(save_tiny_hf_model(root / "model")),
        "--hook_name", "transformer.h.0",
        "--dataset_path", str(write_text_dataset(root / "data")),
        "--training_tokens", str(TOKENS),
        "--seed", "1",
    ]  # fmt: skip


def command(flags: list[str], out: Path, *extra: str) -> list[str]:
    paths = ["--output_path", str(out / "output"), "--checkpoint_path", str(out / "ckpt")]
    return [sys.executable, "-m", "polysae_lens", "train", *flags, *paths, *extra]


ENV = {**os.environ, **OFFLINE_ENV}


def summary(stdout: str) -> str:
    return stdout.strip().splitlines()[-1]


def final_mse(stderr: str) -> float:
    """The MSE loss SAELens's bar shows at the last step (step 200)."""
    return float(stderr.split("200| mse_loss: ")[-1].split(" ")[0])


def value(line: str, name: str) -> float:
    return float(line.split(f"{name}=")[1].split(",")[0])


def interrupt(flags: list[str], out: Path, sig: signal.Signals) -> tuple[Path, dict]:
    """Start a run, send ``sig`` after step 100, check the stop and the checkpoint;
    return the checkpoint directory and its weights."""
    proc = subprocess.Popen(
        command(flags, out), stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=ENV
    )
    assert proc.stderr is not None
    seen = b""
    while f"3200/{TOKENS}".encode() not in seen:  # SAELens's bar after step 100
        chunk = os.read(proc.stderr.fileno(), 4096)
        assert chunk, seen.decode()[-2000:]
        seen += chunk
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    stderr = (seen + err).decode()
    assert proc.returncode == 128 + sig, stderr
    message = stderr.strip().splitlines()[-1]
    assert message.startswith(f"polysae-lens train: interrupted by {sig.name} after "), message
    checkpoint = Path(message.split("--resume_from_checkpoint ")[1])
    n_samples = int(checkpoint.name)
    assert 3200 <= n_samples < TOKENS  # stopped early, after a whole step
    assert n_samples % 32 == 0
    # everything --resume_from_checkpoint reads, and a U on the manifold (no half step)
    for name in ("cfg.json", "sae_weights.safetensors", "activations_store_state.safetensors"):
        assert (checkpoint / name).is_file(), name
    assert (checkpoint / "trainer_state.pt").is_file()
    weights = load_file(checkpoint / "sae_weights.safetensors")
    assert orthogonality_error(weights["U"]).item() < 1e-5
    assert not (out / "output").exists()  # no final model from a stopped run
    return checkpoint, weights


def test_sigint_stops_after_a_step_with_a_checkpoint(run_flags: list[str], tmp_path: Path) -> None:
    interrupt(run_flags, tmp_path, signal.SIGINT)


def test_sigterm_checkpoint_resumes_like_an_uninterrupted_run(
    run_flags: list[str], tmp_path: Path
) -> None:
    # AuxK's own window revives latents on a 200-step tiny run, which turns the
    # resumed run's different data order (below) into larger differences; the
    # count itself resumes exactly (tests/test_dead_latents.py)
    run_flags = [*run_flags, "--aux_dead_window", "0"]
    checkpoint, weights = interrupt(run_flags, tmp_path / "a", signal.SIGTERM)
    resumed = subprocess.run(
        command(run_flags, tmp_path / "a", "--resume_from_checkpoint", str(checkpoint)),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"{TOKENS}/{TOKENS}" in resumed.stderr  # the bar ends at the total, not past it
    full = subprocess.run(
        command(run_flags, tmp_path / "b"), capture_output=True, text=True, env=ENV, timeout=300
    )
    assert full.returncode == 0, full.stderr
    a, b = summary(resumed.stdout), summary(full.stdout)
    assert f"tokens={TOKENS}" in a and f"tokens={TOKENS}" in b
    # the resumed run continues the same training (its data order after the
    # checkpoint differs: SAELens refills the shuffle buffer), so the learned
    # scalars agree but not bitwise. lambda2 travels ~1.1 after the checkpoint and
    # the two runs end within ~0.06; the weak cubic term's lambda3 travels ~0.2 and
    # the data order alone moves its end by ~0.1 at this lr, so for it the test asks
    # that the resumed run moved the same way and ended nearer the full run's value
    # than the checkpoint's
    assert abs(value(a, "lambda2") - value(b, "lambda2")) < 0.15, (a, b)
    for name in ("lambda2", "lambda3"):
        at_checkpoint = weights[name].item()
        moved_a, moved_b = value(a, name) - at_checkpoint, value(b, name) - at_checkpoint
        assert moved_a * moved_b > 0, (name, at_checkpoint, a, b)
        assert abs(moved_a - moved_b) < abs(moved_b), (name, at_checkpoint, a, b)
    loss_a, loss_b = final_mse(resumed.stderr), final_mse(full.stderr)
    assert abs(loss_a - loss_b) < 0.25 * loss_b, (loss_a, loss_b)
    resumed_U = load_file(tmp_path / "a" / "output" / "sae_weights.safetensors")["U"]
    assert resumed_U.shape == weights["U"].shape
    assert not torch.equal(resumed_U, weights["U"])  # it trained on after the checkpoint
