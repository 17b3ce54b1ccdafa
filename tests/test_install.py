"""``make install`` picks the torch build: PyTorch's CPU wheel index on a machine
without an NVIDIA GPU, PyPI's default (CUDA) build with one, either one variable
away (checked with ``make -n``: the commands are printed, not run)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CPU_INDEX = "--extra-index-url https://download.pytorch.org/whl/cpu"


def make_install_plan(tmp_path: Path, gpu: bool, *args: str) -> subprocess.CompletedProcess[str]:
    """``make -n install`` (commands printed, not run) with a fake ``nvidia-smi``
    first on PATH that finds a GPU or fails as on a machine without one."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-0)'\n" if gpu else "#!/bin/sh\nexit 9\n"
    )
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        ["make", "-n", "install", f"VENV={tmp_path / 'venv'}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_make_install_takes_cpu_torch_without_an_nvidia_gpu(tmp_path: Path) -> None:
    plan = make_install_plan(tmp_path, gpu=False)
    assert plan.returncode == 0, plan.stderr
    assert f"pip install -q torch==2.13.0 {CPU_INDEX}" in plan.stdout
    # the index is an extra one: an unreachable index only warns (local wheels still count)
    assert "--index-url" not in plan.stdout.replace("--extra-index-url", "")


def test_make_install_takes_the_default_cuda_torch_with_a_gpu(tmp_path: Path) -> None:
    plan = make_install_plan(tmp_path, gpu=True)
    assert plan.returncode == 0, plan.stderr
    assert "pip install -q torch==2.13.0;" in plan.stdout
    assert CPU_INDEX not in plan.stdout


def test_make_install_build_is_one_variable_away(tmp_path: Path) -> None:
    assert CPU_INDEX not in make_install_plan(tmp_path, False, "TORCH_BUILD=cuda").stdout
    assert CPU_INDEX in make_install_plan(tmp_path, True, "TORCH_BUILD=cpu").stdout
    bad = make_install_plan(tmp_path, False, "TORCH_BUILD=gpu")
    assert bad.returncode != 0
    assert "TORCH_BUILD=gpu is not allowed: use cpu or cuda" in bad.stderr
