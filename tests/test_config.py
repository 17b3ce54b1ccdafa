"""Config defaults, validation messages and the cfg.json contract."""

from __future__ import annotations

import math
from typing import Any

import pytest
from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig, TrainingSAEConfig

from polysae_lens import (
    PolyBatchTopKTrainingSAEConfig,
    PolyGatedTrainingSAEConfig,
    PolyTopKSAEConfig,
    PolyTopKTrainingSAEConfig,
)

from .conftest import sae_cfg_dict


def test_defaults_follow_the_paper() -> None:
    cfg = PolyTopKTrainingSAEConfig(d_in=768, d_sae=16384, k=64)
    assert cfg.poly_order == 3
    assert cfg.poly_ranks == (768, 64, 64)
    assert cfg.lambda2_init == -0.5
    assert cfg.lambda3_init == 0.5
    assert cfg.rescale_acts_by_decoder_norm is False
    assert cfg.decoder_init_norm is None
    assert cfg.architecture() == "poly"


def test_default_ranks_are_capped_by_d_in() -> None:
    assert PolyTopKSAEConfig(d_in=32, d_sae=128, k=4).poly_ranks == (32, 32, 32)


def test_cfg_dict_round_trip_keeps_public_field_names(arch: str) -> None:
    cfg = TrainingSAEConfig.from_dict(sae_cfg_dict(arch))
    as_dict = cfg.to_dict()
    for key in ("poly_order", "poly_ranks", "lambda2_init", "lambda3_init"):
        assert key in as_dict
    assert as_dict["architecture"] == arch
    again = TrainingSAEConfig.from_dict({**as_dict, "poly_ranks": list(as_dict["poly_ranks"])})
    assert again.poly_ranks == cfg.poly_ranks  # type: ignore[attr-defined]
    assert type(again) is type(cfg)


def test_runner_config_accepts_poly_sae_config() -> None:
    runner_cfg = LanguageModelSAERunnerConfig(
        sae=PolyTopKTrainingSAEConfig(d_in=16, d_sae=64, k=4),
        model_name="tiny",
        hook_name="blocks.0.hook_resid_post",
        dataset_path="unused",
        training_tokens=1000,
        logger=LoggingConfig(log_to_wandb=False),
    )
    assert runner_cfg.sae.architecture() == "poly"
    restored = LanguageModelSAERunnerConfig.from_dict(runner_cfg.to_dict())
    assert isinstance(restored.sae, PolyTopKTrainingSAEConfig)


BAD_CONFIGS: list[tuple[dict[str, Any], str]] = [
    ({"poly_order": 4}, "poly_order=4"),
    ({"poly_order": 0}, "poly_order=0"),
    ({"poly_ranks": [0, 4, 4]}, "must be positive"),
    ({"poly_ranks": [12, -1, 4]}, "must be positive"),
    ({"poly_ranks": [12, 4]}, "three integers"),
    ({"poly_ranks": [12, 4.5, 4]}, "three integers"),
    ({"poly_ranks": [8, 9, 4]}, "R2 and R3 must be <= R1=8"),
    ({"poly_ranks": [8, 4, 9]}, "R2 and R3 must be <= R1=8"),
    ({"poly_ranks": [17, 4, 4]}, "min(d_in, d_sae)=16"),
    ({"lambda2_init": math.nan}, "lambda2_init=nan"),
    ({"lambda3_init": math.inf}, "lambda3_init=inf"),
    ({"k": 49}, "k=49 is larger than d_sae=48"),
    ({"k": 0}, "k=0 must be a positive"),
    ({"rescale_acts_by_decoder_norm": True}, "rescale_acts_by_decoder_norm=True"),
    ({"fused_adam": "yes"}, "fused_adam='yes' must be True or False"),
    (
        {"c1_lr_scale": "d_sae/2"},
        "c1_lr_scale='d_sae/2' must be a positive finite number, or None for sqrt(d_sae / R1) "
        "(or 'd_sae/R1')",
    ),
    (
        {"c1_lr_scale": 0.0},
        "c1_lr_scale=0.0 must be a positive finite number, or None for sqrt(d_sae / R1)",
    ),
    ({"u_lr_scale": -0.5}, "u_lr_scale=-0.5 must be a positive finite number, or None for sqrt"),
    ({"u_lr_scale": math.inf}, "u_lr_scale=inf must be a positive"),
    ({"aux_k": 0}, "aux_k=0 is not allowed: use one of ['k', 'd_in/2'] or a positive integer"),
    ({"aux_k": "half"}, "aux_k='half' is not allowed"),
    ({"aux_k": True}, "aux_k=True is not allowed"),
    ({"aux_outside_interactions": 1}, "aux_outside_interactions=1 must be True or False"),
    (
        {"init_preset": "paper"},
        "init_preset='paper' is not allowed: use one of ['package', 'authors']",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_CONFIGS)
def test_bad_config_raises_value_error_naming_field(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=_literal(message)):
        TrainingSAEConfig.from_dict(sae_cfg_dict("poly", **overrides))


def test_r1_larger_than_d_sae_is_rejected() -> None:
    with pytest.raises(ValueError, match=_literal("min(d_in, d_sae)=8")):
        PolyGatedTrainingSAEConfig(d_in=16, d_sae=8, poly_ranks=(12, 4, 4))


def test_topk_k_must_be_integer_but_batchtopk_k_may_be_fractional() -> None:
    with pytest.raises(ValueError, match="must be an integer"):
        PolyTopKTrainingSAEConfig(d_in=16, d_sae=48, k=2.5)  # type: ignore[arg-type]
    assert PolyTopKTrainingSAEConfig(d_in=16, d_sae=48, k=3.0).k == 3  # type: ignore[arg-type]
    assert PolyBatchTopKTrainingSAEConfig(d_in=16, d_sae=48, k=2.5).k == 2.5


def _literal(text: str) -> str:
    import re

    return re.escape(text)
