"""Train a PolySAE on GPT-2 small, layer 8, with the paper's settings.

PolySAE (arXiv 2602.01322, Sec. 5.1), GPT-2 small setting: TopK PolySAE on
``blocks.8.hook_resid_post``, width 16384, k = 64, ranks (R1, R2, R3) =
(768, 64, 64), Adam lr 3e-4 (betas 0.9, 0.999) with a constant schedule,
batches of 4096 tokens, context 128, 300M tokens of OpenWebText, float32,
``normalize_activations="none"``, no decoder-norm rescaling, the AuxK loss
with coefficient 1 on dead latents, and the authors' code's initialisation and
single learning rate (``init_preset="authors"``, ``c1_lr_scale=1.0``,
``u_lr_scale=1.0``, no gauge step: ``gauge_lr_scale=0``). Training
goes through SAELens's stock ``LanguageModelSAETrainingRunner``.

It needs a GPU and network access (GPT-2 and the dataset come from the
HuggingFace hub), and logs to Weights & Biases unless ``--no_wandb``::

    python examples/train_gpt2_paper.py --device cuda --output_path polysae-gpt2-l8

The equivalent command line::

    polysae-lens train --architecture poly --model_name gpt2 \\
        --hook_name blocks.8.hook_resid_post --d_in 768 --d_sae 16384 -k 64 \\
        --poly_ranks 768 64 64 --init_preset authors --c1_lr_scale 1.0 --u_lr_scale 1.0 \\
        --gauge_lr_scale 0 --aux_dead_window 0 --aux_k d_in/2 \\
        --aux_outside_interactions False --subspace_fit_step 0 ...

:func:`build_config` returns the configuration; keyword overrides replace any
field of the runner config, of the SAE config or of the logging config, so the
same code path runs on a tiny model in the tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import torch
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig

import polysae_lens  # noqa: F401  (registers the PolySAE architectures)
from polysae_lens import PolyTopKTrainingSAEConfig, orthogonality_error

if TYPE_CHECKING:
    from sae_lens.config import HfDataset
    from sae_lens.saes.sae import TrainingSAE
    from transformer_lens.hook_points import HookedRootModule

PAPER_SAE: dict[str, Any] = {
    "d_in": 768,
    "d_sae": 16384,
    "k": 64,
    "poly_order": 3,
    "poly_ranks": (768, 64, 64),
    "lambda2_init": -0.5,
    "lambda3_init": 0.5,
    "aux_loss_coefficient": 1.0,
    "rescale_acts_by_decoder_norm": False,
    "normalize_activations": "none",
    "dtype": "float32",
    "stiefel_every_n_steps": 1,
    # The authors' code's initialisation and its single learning rate; the
    # package's defaults ("package", None) train faster (README "Training dynamics").
    "init_preset": "authors",
    "c1_lr_scale": 1.0,
    "u_lr_scale": 1.0,
    "gauge_lr_scale": 0.0,  # the paper's update: no gauge step
    # SAELens's AuxK: no dead window of the SAE's own, k_aux = d_in // 2, all of d_in
    "aux_dead_window": 0,
    "aux_k": "d_in/2",
    "aux_outside_interactions": False,
    "subspace_fit_step": None,  # no data-driven fit of the interaction subspace
}
"""The SAE fields of the paper's GPT-2 small run."""

PAPER_RUNNER: dict[str, Any] = {
    "model_name": "gpt2",
    "model_class_name": "HookedTransformer",
    "hook_name": "blocks.8.hook_resid_post",
    # OpenWebText, pre-tokenized with the GPT-2 tokenizer (parquet, 1024 tokens
    # per row; each row is cut to the context size).
    "dataset_path": "apollo-research/Skylion007-openwebtext-tokenizer-gpt2",
    "is_dataset_tokenized": True,
    "streaming": True,
    "context_size": 128,
    "prepend_bos": True,
    "training_tokens": 300_000_000,
    "train_batch_size_tokens": 4096,
    "store_batch_size_prompts": 32,
    # sae-lens 6.54 mixes activations in a buffer of n_batches_in_buffer *
    # context_size tokens, which must hold at least one training batch; 256 *
    # 128 tokens is 8 batches of 4096.
    "n_batches_in_buffer": 256,
    "lr": 3e-4,
    "lr_end": 3e-4,
    "lr_scheduler_name": "constant",
    "lr_warm_up_steps": 0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "dtype": "float32",
    "device": "cuda",
    "seed": 42,
    "n_checkpoints": 5,
    "checkpoint_path": "checkpoints",
    "output_path": "polysae-gpt2-small-l8",
}
"""The runner fields of the paper's GPT-2 small run."""

PAPER_LOGGING: dict[str, Any] = {
    "log_to_wandb": True,
    "wandb_project": "polysae",
    "wandb_log_frequency": 30,
    "eval_every_n_wandb_logs": 20,
}

_SHARED_FIELDS = ("dtype", "device")
"""Fields of both the runner and the SAE config: an override sets both."""


def build_config(**overrides: Any) -> LanguageModelSAERunnerConfig[PolyTopKTrainingSAEConfig]:
    """The paper's GPT-2 small configuration, with ``overrides`` applied.

    Each override goes to the config that has a field of that name: the SAE
    config (``d_in``, ``k``, ``poly_ranks``, ...), the logging config
    (``log_to_wandb``, ``wandb_project``, ...) or the runner config
    (``model_name``, ``training_tokens``, ...); ``dtype`` and ``device`` go to
    both the SAE and the runner. Unknown names raise ``TypeError``.
    """
    sae_fields = {f.name for f in dataclasses.fields(PolyTopKTrainingSAEConfig)}
    logging_fields = {f.name for f in dataclasses.fields(LoggingConfig)}
    runner_fields = {f.name for f in dataclasses.fields(LanguageModelSAERunnerConfig)}
    sae_kwargs, runner_kwargs, logging_kwargs = (
        dict(PAPER_SAE),
        dict(PAPER_RUNNER),
        dict(PAPER_LOGGING),
    )
    for name, value in overrides.items():
        known = False
        if name in sae_fields:
            sae_kwargs[name], known = value, True
        if name in logging_fields:
            logging_kwargs[name], known = value, True
        if name in runner_fields and name not in ("sae", "logger"):
            runner_kwargs[name], known = value, True
        if not known:
            raise TypeError(f"build_config() got an unknown field {name!r}.")
    if "lr" in overrides and "lr_end" not in overrides:
        runner_kwargs["lr_end"] = runner_kwargs["lr"]  # keep the schedule constant
    for name in _SHARED_FIELDS:
        sae_kwargs[name] = runner_kwargs[name] = overrides.get(name, runner_kwargs[name])
    return LanguageModelSAERunnerConfig(
        sae=PolyTopKTrainingSAEConfig(**sae_kwargs),
        logger=LoggingConfig(**logging_kwargs),
        **runner_kwargs,
    )


def train(
    cfg: LanguageModelSAERunnerConfig[PolyTopKTrainingSAEConfig],
    override_model: HookedRootModule | None = None,
    override_dataset: HfDataset | None = None,
) -> TrainingSAE[Any]:
    """Train with SAELens's stock runner (which also saves to ``cfg.output_path``).

    ``override_model`` / ``override_dataset`` replace the model and dataset the
    runner would otherwise download by name.
    """
    torch.manual_seed(cfg.seed)  # the runner builds the SAE from torch's global RNG
    runner = LanguageModelSAETrainingRunner(
        cfg, override_model=override_model, override_dataset=override_dataset
    )
    return runner.run()


def main(argv: list[str] | None = None) -> TrainingSAE[Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output_path", default=PAPER_RUNNER["output_path"])
    parser.add_argument("--checkpoint_path", default=PAPER_RUNNER["checkpoint_path"])
    parser.add_argument("--wandb_project", default=PAPER_LOGGING["wandb_project"])
    parser.add_argument("--no_wandb", action="store_true", help="do not log to W&B")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    cfg = build_config(
        device=args.device,
        output_path=args.output_path,
        checkpoint_path=args.checkpoint_path,
        wandb_project=args.wandb_project,
        log_to_wandb=not args.no_wandb,
    )
    sae = train(cfg)
    logging.getLogger(__name__).info(
        "saved to %s; lambda2=%.4f lambda3=%.4f orthogonality error %.2e",
        cfg.output_path,
        sae.lambda2.item(),
        sae.lambda3.item(),
        orthogonality_error(sae.U).item(),
    )
    return sae


if __name__ == "__main__":
    main()
