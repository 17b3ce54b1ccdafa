"""Tables, Markdown and the training plot of the in-class study
(:func:`polysae_lens.inclass_study.run_inclass_study`), and the table that puts
it beside the sparse-pair study (:func:`polysae_lens.study.run_study`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

from polysae_lens.inclass_study import seed_verdict
from polysae_lens.report import SAE_LABELS, Row, verdict

LABELS = {
    **SAE_LABELS,
    "poly_previous": "PolySAE, previous defaults",
    "oracle": "oracle PolySAE",
}
"""Column titles of the in-class contenders."""

PLOT_FILE = "inclass_training.png"
SEED_INTERVAL_TITLE = "PolySAE - linear [95% t, seeds]"


class SeedRow(NamedTuple):
    """One line of the in-class table."""

    metric: str
    key: str
    """Metric key in the study's ``summary`` / ``comparisons``."""
    better: str
    """``"higher"``, ``"lower"`` or ``"none"`` (descriptive)."""


SEED_ROWS = (
    SeedRow("MSE (held out)", "mse", "lower"),
    SeedRow("explained variance", "explained_variance", "higher"),
    SeedRow("TopK-to-oracle gap closed", "gap_closed", "higher"),
    SeedRow("interaction recovery (pair cos)", "pair_cos", "higher"),
    SeedRow("atoms matched (share)", "matched", "none"),
    SeedRow("lambda2", "lambda2", "none"),
)


def _num(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if value != 0 and (abs(value) < 1e-4 or abs(value) >= 1e4):
        return f"{value:.2e}"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.5f}"
    return f"{value:.3f}"


def _signed(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:+.3f}"


def _mean_sd(stat: dict[str, Any] | None) -> str:
    if stat is None:
        return "n/a"
    if math.isnan(stat["sd"]):
        return _num(stat["mean"])
    return f"{_num(stat['mean'])} ± {_num(stat['sd'])}"


def _interval(iv: dict[str, Any] | None) -> str:
    if iv is None:
        return ""
    return f"{_signed(iv['difference'])} [{_signed(iv['low'])}, {_signed(iv['high'])}]"


def pair_verdict(inclass: dict[str, Any], a: str, b: str, key: str, better: str) -> str:
    """Words for the seed-noise verdict on ``a`` vs ``b`` for metric ``key``: the
    winner's label, ``tie (within seed noise)``, ``not judged (one seed)``, or ``""``
    when the study has no such comparison."""
    iv = inclass["comparisons"].get(f"{a} - {b}", {}).get(key)
    if iv is None or better == "none":
        return ""
    side = seed_verdict(iv, better)
    return {
        "A": LABELS[a],
        "B": LABELS[b],
        "tie": "tie (within seed noise)",
        "unjudged": "not judged (one seed)",
    }[side]


def quadratic_share(term_shares: dict[str, float]) -> float:
    """The interaction terms' share (quadratic plus cubic) of a term-share dict."""
    return term_shares.get("quadratic", 0.0) + term_shares.get("cubic", 0.0)


def format_inclass_table(inclass: dict[str, Any]) -> str:
    """Mean ± sd over seeds per contender; ``better`` and the interval compare
    PolySAE with the linear TopK SAE against seed noise."""
    summary = inclass["summary"]
    names = [n for n in LABELS if n in summary]
    header = ["metric", *(LABELS[n] for n in names), "better", SEED_INTERVAL_TITLE]
    body: list[list[str]] = []
    for row in SEED_ROWS:
        cells = [_mean_sd(summary[n].get(row.key)) for n in names]
        iv = inclass["comparisons"].get("poly - linear", {}).get(row.key)
        judged = row.better != "none"
        body.append(
            [
                row.metric,
                *cells,
                pair_verdict(inclass, "poly", "linear", row.key, row.better),
                _interval(iv) if judged else "",
            ]
        )
    shares = [_num(quadratic_share(summary[n]["term_shares"])) for n in names]
    body.append(["interaction terms' share of the reconstruction", *shares, "", ""])
    return _markdown_table(header, body, right=range(1, len(names) + 1))


def _markdown_table(header: list[str], body: list[list[str]], right: range) -> str:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        out = []
        for i, (c, w) in enumerate(zip(cells, widths, strict=True)):
            out.append(f" {c:>{w}} " if i in right else f" {c:<{w}} ")
        return "|" + "|".join(out) + "|"

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if i in right else "-" * (w + 2) for i, w in enumerate(widths)
        )
        + "|"
    )
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def side_by_side_table(results: dict[str, Any], sparse_rows: list[Row]) -> str:
    """The two regimes in one table: each contender's MSE, PolySAE's verdicts and
    its interaction terms' share (sparse pairs: one seed, evaluation noise;
    in-class: mean ± sd over seeds, seed noise)."""
    inclass = results["inclass"]
    saes, summary = results["saes"], inclass["summary"]
    mse_row = next(r for r in sparse_rows if r.metric == "MSE (held out)")
    seeds = inclass["config"]["seeds"]
    header = [
        "",
        f"sparse pairs (seed {results['config']['seed']})",
        f"in-class ({len(seeds)} seeds, mean ± sd)",
    ]
    body: list[list[str]] = []
    for name in LABELS:
        sparse = _num(saes[name]["mse"]) if name in saes else "n/a"
        inc = _mean_sd(summary[name]["mse"]) if name in summary else "n/a"
        if sparse == "n/a" and inc == "n/a":
            continue
        body.append([f"MSE, {LABELS[name]}", sparse, inc])
    for other in ("linear", "poly_order1"):
        body.append(
            [
                f"MSE, PolySAE vs {LABELS[other]}",
                verdict(mse_row, other, "poly") or "n/a",
                pair_verdict(inclass, "poly", other, "mse", "lower") or "n/a",
            ]
        )
    if "gap_closed" in summary.get("poly", {}):
        body.append(
            ["TopK-to-oracle gap closed by PolySAE", "n/a", _mean_sd(summary["poly"]["gap_closed"])]
        )
    sparse_share = saes["poly"].get("term_shares")
    body.append(
        [
            "interaction terms' share, PolySAE",
            _num(quadratic_share(sparse_share)) if sparse_share else "n/a",
            _num(quadratic_share(summary["poly"]["term_shares"])) if "poly" in summary else "n/a",
        ]
    )
    return _markdown_table(header, body, right=range(1, 3))


def _comparison_lines(inclass: dict[str, Any]) -> list[str]:
    better = {r.key: r.better for r in SEED_ROWS}
    lines = []
    for pair, by_metric in inclass["comparisons"].items():
        a, b = pair.split(" - ")
        for key, iv in by_metric.items():
            per_seed = ", ".join(_signed(d) for d in iv["per_seed"])
            words = pair_verdict(inclass, a, b, key, better[key])
            lines.append(
                f"- {key}, {LABELS[a]} - {LABELS[b]}: {_interval(iv)} "
                f"(per seed {per_seed}): **{words}**"
            )
    return lines


def _losses(inclass: dict[str, Any]) -> list[str]:
    out = []
    for other in ("linear", "poly_order1", "oracle"):
        for row in SEED_ROWS:
            if row.better == "none":
                continue
            words = pair_verdict(inclass, "poly", other, row.key, row.better)
            if words and words != LABELS["poly"]:
                iv = inclass["comparisons"][f"poly - {other}"][row.key]
                out.append(f"- {row.metric} vs {LABELS[other]}: {words}, {_interval(iv)}")
    return out


def markdown_section(results: dict[str, Any], sparse_rows: list[Row]) -> str:
    """The report's in-class part: both regimes side by side, the in-class table,
    the seed-noise rule and verdicts, and the training plot."""
    inclass = results["inclass"]
    cfg, data = inclass["config"], inclass["config"]["data"]
    seeds = cfg["seeds"]
    truth_share = sum(quadratic_share(t["term_shares"]) for t in inclass["truth"]) / len(
        inclass["truth"]
    )
    losses = _losses(inclass)
    lines = [
        "",
        "# Both regimes side by side",
        "",
        "The sparse-pair study above plants interactions PolySAE can express only "
        "approximately; the in-class study below draws activations from PolySAE's own "
        "model class, where an oracle (PolySAE started at the true decoder) shows what "
        "training could reach.",
        "",
        side_by_side_table(results, sparse_rows),
        "",
        "Sparse-pair verdicts rest on evaluation noise of one seed (bootstrap); in-class "
        "verdicts on seed-to-seed noise (below). The two MSE columns are on different "
        "data and are not comparable with each other.",
        "",
        "## In-class study: data from PolySAE's own model class",
        "",
        f"Activations from a random order-{data['poly_order']} PolySAE decoder: d_in "
        f"{data['d_in']}, {data['num_atoms']} atoms, ranks {tuple(data['ranks'])}, "
        f"{100 * data['quadratic_share']:.0f}% of the centred signal energy in the "
        f"quadratic term, exactly k = {data['k']} active atoms per row (Zipfian "
        "firing), total signal energy "
        f"{data['signal_energy']:g} (an MSE reads as a fraction of it). Every contender "
        f"has width {data['num_atoms']} and k {data['k']} and is trained by SAELens's "
        f"stock SAETrainer (Adam, lr {cfg['lr']:g} constant, batch {cfg['batch_size']}, "
        f"{cfg['steps']} steps) on the same stream; seeds {list(seeds)} each draw their "
        f"own true decoder, stream and initialisation; metrics on {cfg['eval_samples']:,} "
        "held-out rows. `PolySAE, previous defaults` is the package before issue 13's "
        "fourth pass (no gauge step, U's step unscaled, C1's step d_sae / R1, SAELens's AuxK "
        "k and comparison: "
        f"`{_previous_defaults()}`). "
        "The oracle is PolySAE started at the true "
        "decoder with its encoder tied to it, then trained exactly like the others.",
        "",
        format_inclass_table(inclass),
        "",
        "**Rule.** For contenders A and B and a metric, d_s = A_s - B_s on each seed s "
        "(both trained on seed s's data and initialisation); the interval is the paired "
        f"t interval mean(d) ± t(n-1, {(1 + cfg['level']) / 2:g}) sd(d) / sqrt(n) over "
        f"the n = {len(seeds)} seeds. A side wins only when the interval excludes 0; "
        "otherwise the difference is within seed-to-seed noise (`tie`). With one seed "
        "there is no verdict. Few seeds make wide intervals: a tie is no evidence of "
        "equality.",
        "",
        "### Every comparison (A - B, 95% interval over seeds)",
        "",
        *_comparison_lines(inclass),
        "",
        "### Where PolySAE (defaults) does not win in-class",
        "",
        *(losses or ["- PolySAE wins beyond seed noise on every judged comparison."]),
        "",
        "### Over training",
        "",
        "Held-out MSE and the interaction terms' share of the reconstruction energy "
        "(sum of squares over held-out rows), from initialisation to the end; thin "
        "lines are seeds, thick lines their mean. The dashed line is the true decoder's "
        f"share measured the same way ({_num(truth_share)}). A PolySAE on a plateau "
        "keeps a small share and TopK's MSE; leaving it, its share rises toward the "
        "truth's and its MSE toward the oracle's.",
        "",
        f"![in-class training curves]({PLOT_FILE})",
        "",
        "Definitions: `gap closed` = (MSE_TopK - MSE) / (MSE_TopK - MSE_oracle) per seed "
        "(1 = the oracle, 0 = TopK); `pair cos` = "
        "`polysae_lens.inclass.interaction_recovery`: true atoms matched one to one to "
        "learned latents by the cosine of their first-order decoder rows (Hungarian, "
        "kept at >= 0.7; `atoms matched` is the share kept), then the cosine of planted "
        "and learned pairwise interaction vectors v_ij, weighted by how often the pair "
        f"co-fires in {cfg['recovery_samples']:,} generated rows.",
        "",
        "In-class runtime: "
        + ", ".join(f"{k[len('inclass_') :]} {v:.0f} s" for k, v in _runtime(results).items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


def _previous_defaults() -> str:
    """The previous defaults' fields as ``name=value`` pairs."""
    from polysae_lens.config import PREVIOUS_TRAINING_DEFAULTS

    return ", ".join(f"{k}={v!r}" for k, v in PREVIOUS_TRAINING_DEFAULTS.items())


def _runtime(results: dict[str, Any]) -> dict[str, float]:
    """The in-class timings (``inclass_*`` in the results' ``runtime_seconds``)."""
    return {k: v for k, v in results.get("runtime_seconds", {}).items() if k.startswith("inclass_")}


def write_plot(inclass: dict[str, Any], out_dir: Path) -> Path:
    """:data:`PLOT_FILE`: MSE and the interaction terms' share over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mse, ax_share) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    batch = inclass["config"]["batch_size"]
    for color, (name, per_seed) in zip(colors, inclass["curves"].items(), strict=False):
        steps = [p["samples"] / batch for p in per_seed[0]]
        mse = [[p["mse"] for p in curve] for curve in per_seed]
        share = [[quadratic_share(p["term_shares"]) for p in curve] for curve in per_seed]
        for m, s in zip(mse, share, strict=True):
            ax_mse.plot(steps, m, color=color, alpha=0.25, lw=0.8)
            if name not in ("linear", "poly_order1"):
                ax_share.plot(steps, s, color=color, alpha=0.25, lw=0.8)
        ax_mse.plot(steps, _mean(mse), color=color, lw=2, marker="o", ms=3, label=LABELS[name])
        if name not in ("linear", "poly_order1"):
            ax_share.plot(
                steps, _mean(share), color=color, lw=2, marker="o", ms=3, label=LABELS[name]
            )
    truth = [quadratic_share(t["term_shares"]) for t in inclass["truth"]]
    ax_share.axhline(sum(truth) / len(truth), color="k", ls="--", lw=1, label="true decoder")
    ax_mse.set_yscale("log")
    ax_mse.set_xlabel("training steps")
    ax_mse.set_ylabel("held-out MSE")
    ax_mse.set_title("In-class: MSE over training")
    ax_mse.legend(fontsize=8)
    ax_share.set_yscale("log")
    ax_share.set_xlabel("training steps")
    ax_share.set_ylabel("interaction terms' share of reconstruction energy")
    ax_share.set_title("In-class: polynomial terms over training")
    ax_share.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / PLOT_FILE
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _mean(rows: list[list[float]]) -> list[float]:
    return [sum(col) / len(col) for col in zip(*rows, strict=True)]
