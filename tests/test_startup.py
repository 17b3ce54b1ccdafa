"""Start-up cost: ``import polysae_lens`` and ``polysae-lens ... --help`` load no
heavy library, and the architectures still register as soon as SAELens loads.

Asserted by what was *not* imported (in fresh interpreters), not by timing.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import polysae_lens
from polysae_lens import cli, train_help
from polysae_lens.config import PolyDecoderFields, _PolyTrainingDefaults

HEAVY = ("torch", "sae_lens", "transformer_lens", "transformers", "datasets", "numpy")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300
    )


def loaded_after_cli(argv: list[str]) -> tuple[list[str], str, int]:
    """Run ``python -m polysae_lens *argv`` in a fresh interpreter; return the heavy
    top-level packages it had imported, its stdout and its exit status."""
    code = f"""
import contextlib, io, json, runpy, sys
sys.argv = ["polysae-lens", *{argv!r}]
out = io.StringIO()
status = 0
with contextlib.redirect_stdout(out):
    try:
        runpy.run_module("polysae_lens", run_name="__main__")
    except SystemExit as e:
        status = e.code or 0
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
print(json.dumps({{"heavy": heavy, "out": out.getvalue(), "status": status}}))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report["heavy"], report["out"], report["status"]


@pytest.mark.parametrize(
    "argv", [["train", "--help"], ["train"], ["--help"], ["demo", "--help"]], ids=" ".join
)
def test_help_imports_no_heavy_library(argv: list[str]) -> None:
    heavy, out, status = loaded_after_cli(argv)
    assert status == 0
    assert heavy == []
    assert out.startswith("usage: polysae-lens")


def test_train_help_tells_the_truth() -> None:
    _, out, _ = loaded_after_cli(["train", "--help"])
    # the plugin's description right after the usage line, the real default
    assert out.splitlines()[2].startswith("Train a PolySAE")
    assert "--architecture defaults to 'poly'" in out
    assert "good idea" not in out
    assert "(default: standard)" not in out
    for arch in polysae_lens.ARCHITECTURES:
        assert arch in out
    # every PolySAE config field (committed or added later) is listed, with its default
    fields = {f.name: f for f in dataclasses.fields(_PolyTrainingDefaults)}
    fields.update({f.name: f for f in dataclasses.fields(PolyDecoderFields)})
    for name, field in fields.items():
        assert re.search(rf"--{name} \[{re.escape(repr(field.default))}\]", out), name
    for flag in ("--training_tokens", "--hook_name", "--resume_from_checkpoint", "--log_to_wandb"):
        assert flag in out


def test_quick_help_names_only_real_flags(capsys: pytest.CaptureFixture[str]) -> None:
    """The hand-written SAELens flags exist in SAELens's parser (``--help-all``)."""
    with pytest.raises(SystemExit):
        cli.main(["train", "--help-all"])
    full = capsys.readouterr().out
    for flags in train_help.SAE_LENS_FLAGS.values():
        for spec, _ in flags:
            for flag in re.findall(r"--?\w+", spec):
                assert re.search(rf"(^|[\s\[,]){flag}[\s\],]", full), flag


def test_help_all_is_sae_lens_help_corrected(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help-all"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: polysae-lens train")
    description = out.split("\n\n")[1]
    assert description.startswith("Train a PolySAE")
    assert "(default: poly)" in out
    assert "(default: standard)" not in out
    assert "good idea" not in out
    assert "--poly_ranks" in out and "--dead_feature_window" in out
    # SAELens's own architectures keep SAELens's advice and their default
    with pytest.raises(SystemExit):
        cli.main(["train", "--architecture", "topk", "--help-all"])
    assert "(default: topk)" in capsys.readouterr().out


def test_poly_architecture_names_match_the_registry() -> None:
    assert train_help.POLY_ARCHITECTURES == polysae_lens.ARCHITECTURES


def test_import_is_lazy_and_registers_when_sae_lens_loads() -> None:
    result = run_python(
        "import sys, polysae_lens\n"
        f"assert not set(sys.modules) & set({HEAVY!r}), sorted(set(sys.modules) & set({HEAVY!r}))\n"
        "from sae_lens import SAE\n"
        "from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY\n"
        "for arch in polysae_lens.ARCHITECTURES:\n"
        "    assert arch in SAE_TRAINING_CLASS_REGISTRY, arch\n"
        "assert SAE_CLASS_REGISTRY['poly'][0] is polysae_lens.PolyTopKSAE\n"
        "assert polysae_lens.sae.is_poly_sae is polysae_lens.is_poly_sae\n"
        "assert 'PolyTopKSAE' in dir(polysae_lens)\n"
        "print('OK')\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "OK"


def test_any_module_sae_py_imports_can_be_imported_first() -> None:
    # each of these is imported by sae.py, which the registration imports as soon
    # as SAELens has loaded: when one of them is what loads SAELens, sae.py must
    # wait for it to finish (it failed with a circular ImportError for config,
    # dead_latents, auxk and init)
    tree = ast.parse(Path(polysae_lens.__file__).with_name("sae.py").read_text())
    modules = sorted(
        {
            node.module
            for node in tree.body
            if isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("polysae_lens.")
        }
    )
    assert {"polysae_lens.config", "polysae_lens.dead_latents"} <= set(modules)
    code = (
        "import importlib, sys\n"
        "importlib.import_module(sys.argv[1])\n"
        "import sae_lens\n"
        "from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY\n"
        "import polysae_lens\n"
        "assert set(polysae_lens.ARCHITECTURES) <= set(SAE_TRAINING_CLASS_REGISTRY)\n"
        "print('OK')\n"
    )
    runs = {
        module: subprocess.Popen(
            [sys.executable, "-c", code, module],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for module in modules
    }
    for module, run in runs.items():
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0 and out.strip() == "OK", f"import {module} first: {err}"


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = polysae_lens.nope  # type: ignore[attr-defined]
