"""Issue 13's interaction-recovery metric (``inclass.interaction_recovery``).

References are written out pair by pair from the formula
``v_ij = 2 lambda2 sum_{r<R2} U[i, r] U[j, r] C2[r]`` and share no code with the
function under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from polysae_lens.inclass import (
    InClassConfig,
    build_in_class,
    interaction_recovery,
    oracle_sae,
    quadratic_output_cosines,
)
from polysae_lens.polynomial import PolyDecoderWeights

# d_in 32 so that distinct random atoms stay far below the 0.7 matching threshold.
CFG = InClassConfig(d_in=32, num_atoms=40, ranks=(24, 4, 3), k=3, calibration_samples=4096, seed=7)


@pytest.fixture(scope="module")
def setup():  # type: ignore[no-untyped-def]
    truth = build_in_class(CFG)
    z = truth.sample(2000, truth.generator(5)).z_BN
    return truth.weights, z


def reference_cosines(truth, learned, match, z):  # type: ignore[no-untyped-def]
    """Per co-firing pair (i < j, both matched): (cosine, co-firing count), by loops."""
    counts: dict[tuple[int, int], int] = {}
    for row in z:
        active = [int(i) for i in torch.nonzero(row).flatten()]
        for a in active:
            for b in active:
                if a < b:
                    counts[(a, b)] = counts.get((a, b), 0) + 1

    def v(w, i, j):  # type: ignore[no-untyped-def]
        out = torch.zeros(w.C2_SD.shape[1], dtype=torch.float64)
        for r in range(w.C2_SD.shape[0]):
            out += 2 * float(w.lambda2) * float(w.U_FR[i, r]) * float(w.U_FR[j, r]) * w.C2_SD[r]
        return out

    result = []
    for (i, j), n in counts.items():
        if match[i] < 0 or match[j] < 0:
            continue
        a, b = v(truth, i, j), v(learned, match[i], match[j])
        result.append((float(a @ b / (a.norm() * b.norm())), n))
    return result, counts


def test_oracle_scores_one_with_every_atom_matched(setup) -> None:  # type: ignore[no-untyped-def]
    w, z = setup
    rec = interaction_recovery(w, w, z)
    assert rec.matched_fraction == 1.0
    assert torch.equal(rec.match_N, torch.arange(CFG.num_atoms))
    assert rec.mean_cos == pytest.approx(1.0, abs=1e-9)
    assert rec.weighted_cos == pytest.approx(1.0, abs=1e-9)
    assert rec.strict_weighted_cos == pytest.approx(1.0, abs=1e-9)
    assert rec.pair_coverage == 1.0
    assert rec.n_pairs > 100


def test_permuted_and_rescaled_latents_are_matched(setup) -> None:  # type: ignore[no-untyped-def]
    w, z = setup
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(CFG.num_atoms, generator=gen)  # true atom i -> learned latent perm[i]
    scale = 0.2 + torch.rand(CFG.num_atoms, 1, generator=gen)  # positive latent scales
    U = torch.empty_like(w.U_FR)
    U[perm] = w.U_FR * scale
    learned = w._replace(U_FR=U, lambda2=w.lambda2 * 3.0)
    rec = interaction_recovery(w, learned, z)
    assert torch.equal(rec.match_N, perm)
    assert rec.mean_cos == pytest.approx(1.0, abs=1e-9)
    assert rec.weighted_cos == pytest.approx(1.0, abs=1e-9)


def test_random_c2_scores_near_zero(setup) -> None:  # type: ignore[no-untyped-def]
    w, z = setup
    gen = torch.Generator().manual_seed(1)
    assert w.C2_SD is not None
    learned = w._replace(C2_SD=torch.randn(w.C2_SD.shape, generator=gen))
    rec = interaction_recovery(w, learned, z)
    assert rec.matched_fraction == 1.0  # the first-order part is still the truth
    assert abs(rec.mean_cos) < 0.15
    assert abs(rec.weighted_cos) < 0.15


def test_matches_the_formula_pair_by_pair(setup) -> None:  # type: ignore[no-untyped-def]
    w, z = setup
    gen = torch.Generator().manual_seed(2)
    assert w.C2_SD is not None
    learned = w._replace(C2_SD=w.C2_SD + 0.7 * torch.randn(w.C2_SD.shape, generator=gen))
    rec = interaction_recovery(w, learned, z)
    w64 = w._replace(U_FR=w.U_FR.double(), C2_SD=w.C2_SD.double())
    l64 = learned._replace(U_FR=learned.U_FR.double(), C2_SD=learned.C2_SD.double())
    pairs, counts = reference_cosines(w64, l64, list(range(CFG.num_atoms)), z)
    assert rec.n_pairs == len(counts)
    mean = sum(c for c, _ in pairs) / len(pairs)
    weighted = sum(c * n for c, n in pairs) / sum(n for _, n in pairs)
    assert 0.2 < mean < 0.95  # a partial match, not a trivial 0 or 1
    assert rec.mean_cos == pytest.approx(mean, abs=1e-9)
    assert rec.weighted_cos == pytest.approx(weighted, abs=1e-9)


def test_unmatched_atoms_are_left_out_and_counted(setup) -> None:  # type: ignore[no-untyped-def]
    w, z = setup
    dead = [0, 5, 11, 23, 31]
    U = w.U_FR.clone()
    U[dead] = 0.0  # dead latents: no first-order row, no match for their atoms
    rec = interaction_recovery(w, w._replace(U_FR=U), z)
    expected = [-1 if i in dead else i for i in range(CFG.num_atoms)]
    assert rec.match_N.tolist() == expected
    assert rec.matched_fraction == pytest.approx(35 / 40)
    assert math.isnan(float(rec.match_cos_N[0]))
    _, counts = reference_cosines(w, w, expected, z)
    total = sum(counts.values())
    kept = sum(n for (i, j), n in counts.items() if i not in dead and j not in dead)
    assert rec.pair_coverage == pytest.approx(kept / total)
    assert rec.weighted_cos == pytest.approx(1.0, abs=1e-9)
    assert rec.strict_weighted_cos == pytest.approx(kept / total, abs=1e-9)
    assert rec.strict_weighted_cos < 0.95


def test_bad_inputs_say_what_to_do(setup) -> None:  # type: ignore[no-untyped-def]
    w, z = setup
    order1 = w._replace(C2_SD=None, lambda2=None, C3_TD=None, lambda3=None)
    with pytest.raises(ValueError, match="order-1 model has no pairwise"):
        interaction_recovery(w, order1, z)
    with pytest.raises(ValueError, match=r"expected \[B, 40\]"):
        interaction_recovery(w, w, z[:, :10])
    with pytest.raises(ValueError, match=r"match_threshold=1\.5"):
        interaction_recovery(w, w, z, match_threshold=1.5)


def test_benchmark_reports_pair_cos_for_quadratic_models_only() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import inclass as bench

    truth = build_in_class(bench.QUICK_CFG)
    metric = bench.recovery_metric(truth, n=512)
    rows = {c.name: c for c in bench.contenders()}
    oracle = metric(bench.build(rows["oracle"], truth, k=bench.QUICK_CFG.k))
    assert oracle is not None
    assert oracle["pair_cos"] == pytest.approx(1.0, abs=1e-6)
    assert oracle["matched"] == 1.0
    fresh = metric(bench.build(rows["poly2"], truth, k=bench.QUICK_CFG.k))
    assert fresh is not None and fresh["matched"] < 0.5  # a random decoder matches few atoms
    assert metric(bench.build(rows["poly1"], truth, k=bench.QUICK_CFG.k)) is None
    assert metric(bench.build(rows["topk"], truth, k=bench.QUICK_CFG.k)) is None


def with_C2(C2_SD: torch.Tensor) -> PolyDecoderWeights:
    """A decoder whose quadratic term writes through ``C2_SD`` (the rest is filler:
    the output space depends on C2 alone)."""
    d = C2_SD.shape[1]
    return PolyDecoderWeights(
        torch.eye(6, 4), torch.ones(4, d), C2_SD, None, torch.tensor(0.5), None
    )


E = torch.eye(4, dtype=torch.float64)


@pytest.mark.parametrize(
    ("learned_rows", "expected"),
    [
        ([E[0], E[1]], [1.0, 1.0]),  # the same space
        ([3 * E[1] - E[0], E[0] + E[1]], [1.0, 1.0]),  # other rows, the same span
        ([E[0], E[2]], [1.0, 0.0]),  # one direction missed
        ([E[0], (E[1] + E[2]) / math.sqrt(2)], [1.0, 1 / math.sqrt(2)]),  # half-way: 45 degrees
        ([E[2], E[3]], [0.0, 0.0]),  # all missed
        ([E[0], 0 * E[1]], [1.0, 0.0]),  # a zero row writes nowhere: padded with 0
    ],
)
def test_quadratic_output_cosines_hand_set(learned_rows, expected) -> None:  # type: ignore[no-untyped-def]
    # true quadratic output space span(e0, e1) in d_in 4; principal cosines by hand
    truth = with_C2(torch.stack([E[0], 2 * E[1]]))
    cos = quadratic_output_cosines(truth, with_C2(torch.stack(learned_rows)))
    assert cos.tolist() == pytest.approx(expected, abs=1e-12)


def test_quadratic_output_cosines_of_a_trained_model_and_of_a_wider_or_narrower_one() -> None:
    truth = build_in_class(CFG)
    s = CFG.ranks[1]
    sae = oracle_sae(truth, CFG.k)  # a module: read through its decoder weights
    assert quadratic_output_cosines(truth.weights, sae).tolist() == pytest.approx([1.0] * s)
    gen = torch.Generator().manual_seed(0)
    C2 = truth.weights.C2_SD.double()
    # rows mixed by an invertible matrix and one extra row: still every direction
    wider = torch.cat([torch.randn(s, s, generator=gen, dtype=torch.float64) @ C2,
                       torch.randn(1, CFG.d_in, generator=gen, dtype=torch.float64)])  # fmt: skip
    assert quadratic_output_cosines(truth.weights, with_C2(wider)).tolist() == pytest.approx(
        [1.0] * s
    )
    # one row fewer: at most s - 1 directions, and one cosine is 0
    cos = quadratic_output_cosines(truth.weights, with_C2(C2[:-1]))
    assert cos.shape == (s,)
    assert cos[: s - 1].tolist() == pytest.approx([1.0] * (s - 1)) and cos[-1] == 0


def test_quadratic_output_cosines_refuses_order_one_and_other_d_in() -> None:
    truth = with_C2(torch.stack([E[0], E[1]]))
    order1 = PolyDecoderWeights(torch.eye(6, 4), torch.ones(4, 4), None, None, None, None)
    with pytest.raises(ValueError, match="C2 is None"):
        quadratic_output_cosines(truth, order1)
    with pytest.raises(ValueError, match="d_in differs: truth 4, learned 5"):
        quadratic_output_cosines(truth, with_C2(torch.eye(2, 5)))
