"""Fresh-init statistics of the two init presets, against first-principles values.

The expected numbers come from the distributions themselves, not from the
package: torch's ``kaiming_uniform_`` with its defaults (a = 0, leaky_relu) has
gain sqrt(2) and bound gain * sqrt(3 / fan_in) = sqrt(6 / fan_in), so its
entries have std bound / sqrt(3) = sqrt(2 / fan_in), where fan_in is the
second dimension of the tensor it fills. The authors' code fills C's stored as
[d_in, R] (fan_in = R); the package stores them as [R, d_in] (fan_in = d_in).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE, TrainingSAE, TrainingSAEConfig

from polysae_lens import PolyTopKTrainingSAEConfig, cli

from .conftest import sae_cfg_dict

# (d_in, d_sae, (R1, R2, R3)): the second shape has R1 < d_in, so C1's scale
# tells fan_in = R1 from fan_in = d_in.
SHAPES = [(128, 1024, (128, 16, 16)), (256, 512, (64, 8, 8))]
SHAPE_IDS = ["d128-R16", "d256-R64-8"]


def fresh_sae(d_in: int, d_sae: int, ranks: tuple[int, int, int], **fields: Any) -> Any:
    torch.manual_seed(0)
    cfg = PolyTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=16, poly_ranks=ranks, **fields)
    return TrainingSAE.from_dict(cfg.to_dict())


def kaiming_bound(fan_in: int) -> float:
    return math.sqrt(2.0) * math.sqrt(3.0 / fan_in)


def assert_uniform_on(values: torch.Tensor, bound: float) -> None:
    """``values`` look like samples of U(-bound, bound): std bound / sqrt(3)
    within 5%, support reaching (but not passing) the bound."""
    values = values.detach().double().flatten()
    assert values.std().item() == pytest.approx(bound / math.sqrt(3.0), rel=0.05)
    assert values.abs().max().item() <= bound * (1 + 1e-6)
    assert values.abs().max().item() >= 0.97 * bound
    assert abs(values.mean().item()) < 0.05 * bound


@pytest.mark.parametrize(("d_in", "d_sae", "ranks"), SHAPES, ids=SHAPE_IDS)
def test_authors_preset_draws_cs_with_fan_in_r(
    d_in: int, d_sae: int, ranks: tuple[int, int, int]
) -> None:
    r1, r2, r3 = ranks
    sae = fresh_sae(d_in, d_sae, ranks, init_preset="authors")
    assert tuple(sae.C1.shape) == (r1, d_in)
    assert tuple(sae.C2.shape) == (r2, d_in)
    assert tuple(sae.C3.shape) == (r3, d_in)
    assert_uniform_on(sae.C1, kaiming_bound(r1))
    assert_uniform_on(sae.C2, kaiming_bound(r2))
    assert_uniform_on(sae.C3, kaiming_bound(r3))


@pytest.mark.parametrize(("d_in", "d_sae", "ranks"), SHAPES, ids=SHAPE_IDS)
def test_authors_c2_is_sqrt_d_in_over_r2_times_the_package_c2(
    d_in: int, d_sae: int, ranks: tuple[int, int, int]
) -> None:
    authors = fresh_sae(d_in, d_sae, ranks, init_preset="authors")
    package = fresh_sae(d_in, d_sae, ranks, init_preset="package")
    assert_uniform_on(package.C2, kaiming_bound(d_in))
    ratio = authors.C2.std().item() / package.C2.std().item()
    assert ratio == pytest.approx(math.sqrt(d_in / ranks[1]), rel=0.07)  # 2.83, 5.66


@pytest.mark.parametrize(("d_in", "d_sae", "ranks"), SHAPES, ids=SHAPE_IDS)
def test_authors_encoder_is_an_untied_placeholder_with_column_norm_0_1(
    d_in: int, d_sae: int, ranks: tuple[int, int, int]
) -> None:
    sae = fresh_sae(d_in, d_sae, ranks, init_preset="authors")
    W_enc = sae.W_enc.detach().double()
    assert tuple(W_enc.shape) == (d_in, d_sae)
    torch.testing.assert_close(
        W_enc.norm(dim=0), torch.full((d_sae,), 0.1, dtype=torch.float64), rtol=0, atol=1e-5
    )
    # Each latent's encoder column against its first-order decoder row: drawn
    # independently, so cosines average 0 and |cosine| averages about
    # sqrt(2 / (pi * d_in)) (independent directions in d_in dimensions); tied
    # they would all be 1.
    W_dec = (sae.U.detach() @ sae.C1.detach()).double()
    cos = torch.nn.functional.cosine_similarity(W_enc.T, W_dec, dim=-1)
    assert abs(cos.mean().item()) < 5 / math.sqrt(d_in * d_sae)
    assert cos.abs().mean().item() == pytest.approx(math.sqrt(2 / (math.pi * d_in)), rel=0.25)
    assert cos.abs().max().item() < 0.5


@pytest.mark.parametrize(("d_in", "d_sae", "ranks"), SHAPES, ids=SHAPE_IDS)
def test_authors_preset_keeps_u_orthonormal_zero_biases_and_lambdas(
    d_in: int, d_sae: int, ranks: tuple[int, int, int]
) -> None:
    sae = fresh_sae(d_in, d_sae, ranks, init_preset="authors")
    U = sae.U.detach().double()
    torch.testing.assert_close(U.T @ U, torch.eye(ranks[0], dtype=torch.float64), atol=1e-5, rtol=0)
    assert (sae.b_dec == 0).all() and (sae.b_enc == 0).all()
    assert sae.lambda2.item() == -0.5
    assert sae.lambda3.item() == 0.5


@pytest.mark.parametrize(
    "preset_fields", [{"init_preset": "package"}, {}], ids=["explicit", "default"]
)
def test_package_preset_ties_the_encoder_to_the_first_order_decoder(
    preset_fields: dict[str, Any],
) -> None:
    d_in, d_sae, ranks = SHAPES[0]
    sae = fresh_sae(d_in, d_sae, ranks, **preset_fields)
    assert sae.cfg.init_preset == "package"
    assert sae.cfg.c1_init == "orthogonal"
    assert sae.cfg.decoder_init_norm is None
    torch.testing.assert_close(sae.W_enc, (sae.U @ sae.C1).T)


def test_authors_preset_records_the_init_it_draws_in_the_config() -> None:
    cfg = PolyTopKTrainingSAEConfig(d_in=16, d_sae=48, k=4, init_preset="authors")
    assert (cfg.init_preset, cfg.c1_init, cfg.decoder_init_norm) == ("authors", "kaiming", 0.1)
    assert cfg.c1_lr_scale is None  # a training setting, not part of the init
    # an explicit decoder_init_norm is the encoder's column norm
    sae = fresh_sae(32, 64, (32, 8, 8), init_preset="authors", decoder_init_norm=0.25)
    torch.testing.assert_close(sae.W_enc.norm(dim=0), torch.full((64,), 0.25))


def test_init_preset_survives_save_and_load(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    sae = TrainingSAE.from_dict(sae_cfg_dict(arch, init_preset="authors"))
    sae.save_model(tmp_path)
    reloaded = TrainingSAE.load_from_disk(tmp_path)
    assert reloaded.cfg.init_preset == "authors"  # type: ignore[attr-defined]
    assert reloaded.cfg.c1_init == "kaiming"  # type: ignore[attr-defined]
    assert reloaded.cfg.decoder_init_norm == 0.1
    reloaded_params = dict(reloaded.named_parameters())
    for name, value in sae.named_parameters():
        assert torch.equal(reloaded_params[name], value), name
    SAE.load_from_disk(tmp_path)  # the inference form loads too
    again = TrainingSAEConfig.from_dict(sae.cfg.to_dict())
    assert again.init_preset == "authors"  # type: ignore[attr-defined]


def test_bad_init_preset_names_the_value_and_the_allowed_ones() -> None:
    with pytest.raises(ValueError) as info:
        TrainingSAEConfig.from_dict(sae_cfg_dict("poly", init_preset="paper"))
    message = str(info.value)
    assert "init_preset='paper'" in message
    assert "'package'" in message and "'authors'" in message


def test_cli_takes_init_preset() -> None:
    cfg = cli.parse_train_args(
        ["--d_in", "16", "--d_sae", "48", "--k", "4", "--init_preset", "authors"]
    )
    assert cfg.sae.init_preset == "authors"  # type: ignore[attr-defined]
    assert cfg.sae.c1_init == "kaiming"  # type: ignore[attr-defined]


def test_paper_example_uses_the_authors_init_and_one_learning_rate() -> None:
    path = Path(__file__).resolve().parents[1] / "examples" / "train_gpt2_paper.py"
    spec = importlib.util.spec_from_file_location("train_gpt2_paper_init", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    sae_cfg = example.build_config().sae
    assert (sae_cfg.init_preset, sae_cfg.c1_init, sae_cfg.c1_lr_scale) == (
        "authors",
        "kaiming",
        1.0,
    )
    assert sae_cfg.decoder_init_norm == 0.1
    from polysae_lens.config import PAPER_TRAINING_SETTINGS

    # every field of the paper's training recipe, gauge step and U scale included
    assert {name: getattr(sae_cfg, name) for name in PAPER_TRAINING_SETTINGS} == (
        PAPER_TRAINING_SETTINGS
    )
