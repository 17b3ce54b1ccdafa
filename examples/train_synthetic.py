"""Train a stock SAELens TopK SAE and a PolySAE on the same synthetic activations.

Offline and CPU-only: activations come from ``sae_lens.synthetic`` (a random
feature dictionary with sparse, independent firing), both SAEs are trained by
SAELens's own ``train_toy_sae`` (its stock ``SAETrainer``) with the same width,
k, learning rate and samples, and both are scored with
``eval_sae_on_synthetic_data``. Run with::

    python examples/train_synthetic.py --samples 400000

These activations have no interactions to find; ``polysae-lens demo`` (``make
demo``) is the study with planted interactions.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.synthetic import (
    ActivationGenerator,
    FeatureDictionary,
    eval_sae_on_synthetic_data,
    train_toy_sae,
)

import polysae_lens
from polysae_lens import PolyTopKTrainingSAE, PolyTopKTrainingSAEConfig


def build_saes(d_in: int, d_sae: int, k: int) -> dict[str, Any]:
    torch.manual_seed(0)
    stock = TopKTrainingSAE(
        TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, rescale_acts_by_decoder_norm=False)
    )
    torch.manual_seed(0)
    poly = PolyTopKTrainingSAE(PolyTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    return {"topk (SAELens)": stock, "poly (PolySAE)": poly}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=32)
    parser.add_argument("--num-features", type=int, default=256)
    parser.add_argument("--d-sae", type=int, default=512)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--samples", type=int, default=400_000)
    args = parser.parse_args(argv)

    feature_dict = FeatureDictionary(args.num_features, args.d_in, seed=0)
    generator = ActivationGenerator(args.num_features, firing_probabilities=0.02)
    results: dict[str, dict[str, float]] = {}
    for name, sae in build_saes(args.d_in, args.d_sae, args.k).items():
        torch.manual_seed(1)
        train_toy_sae(sae, feature_dict, generator, training_samples=args.samples)
        torch.manual_seed(2)
        evaluation = eval_sae_on_synthetic_data(sae, feature_dict, generator, num_samples=20_000)
        results[name] = {
            "explained_variance": evaluation.explained_variance,
            "l0": evaluation.sae_l0,
            "dead_latents": evaluation.dead_latents,
            "mcc": evaluation.mcc,
        }
        if polysae_lens.is_poly_sae(sae):
            results[name]["orthogonality_error"] = polysae_lens.orthogonality_error(sae.U).item()

    columns = ["explained_variance", "l0", "dead_latents", "mcc"]
    print(f"{'SAE':<16}" + "".join(f"{c:>20}" for c in columns))
    for name, row in results.items():
        print(f"{name:<16}" + "".join(f"{row[c]:>20.4f}" for c in columns))
    return results


if __name__ == "__main__":
    main()
