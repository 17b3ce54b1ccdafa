"""Tables, Markdown and plots for the results of :func:`polysae_lens.study.run_study`."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple

from polysae_lens.noise import Interval

Better = Literal["higher", "lower", "closer_to_zero", "none"]

PLOT_FILES = {
    "strength": "strength_learned_vs_planted.png",
    "cooccurrence": "interaction_vs_cooccurrence.png",
    "terms": "decoder_term_shares.png",
}


SAE_LABELS = {"linear": "linear TopK", "poly": "PolySAE", "poly_order1": "PolySAE order 1"}
"""Column titles of the SAEs a study trains (``poly_order1`` is the ablation)."""


class Row(NamedTuple):
    """One line of the side-by-side table."""

    metric: str
    values: dict[str, float | None]
    """Value per SAE name (keys of :data:`SAE_LABELS` present in the results)."""
    better: Better
    """Which direction is better; ``"none"`` for descriptive rows."""
    intervals: dict[str, Interval] | None = None
    """Noise estimate of ``values["poly"] - values[other]`` per other SAE name
    (:func:`polysae_lens.noise.paired_bootstrap`); ``None`` when there is none."""

    def interval(self, a: str = "linear", b: str = "poly") -> Interval | None:
        """The interval of ``b - a``, when there is one (``b`` must be ``"poly"``)."""
        if b != "poly" or not self.intervals:
            return None
        return self.intervals.get(a)

    def winner(self, a: str = "linear", b: str = "poly") -> str:
        """Which of SAEs ``a`` and ``b`` is better: their name, or ``"tie"`` when
        the noise interval of the difference contains 0, ``"unjudged"`` when it
        rests on fewer than :data:`MIN_UNITS` units; ``""`` when not comparable
        or without a noise estimate (no verdict without one)."""
        va, vb = self.values.get(a), self.values.get(b)
        if self.better in ("none", "closer_to_zero") or va is None or vb is None:
            return ""
        if math.isnan(va) or math.isnan(vb):
            return ""
        interval = self.interval(a, b)
        if interval is None:
            return ""
        if interval.n_units < MIN_UNITS:
            return "unjudged"
        if not interval.excludes_zero():
            return "tie"
        # The interval's side, not the observed difference, decides.
        b_larger = interval.low > 0
        return b if b_larger == (self.better == "higher") else a


MIN_UNITS = 10
"""Fewest resampled units (e.g. composition tasks) a verdict rests on: a bootstrap
over fewer says little about the noise."""

VERDICT_WORDS = {"tie": "tie (within noise)", "unjudged": "not judged (too few units)", "": ""}


def verdict(row: Row, a: str = "linear", b: str = "poly") -> str:
    """The words for :meth:`Row.winner`: the winner's label or ``tie (within noise)``."""
    w = row.winner(a, b)
    return VERDICT_WORDS.get(w, SAE_LABELS.get(w, w))


def _fmt_interval(interval: Interval | None) -> str:
    if interval is None:
        return ""
    return (
        f"{_fmt_signed(interval.difference)} "
        f"[{_fmt_signed(interval.low)}, {_fmt_signed(interval.high)}]"
    )


def _fmt_signed(value: float) -> str:
    if value == 0:
        return "0"
    if value == int(value) and abs(value) >= 1:
        return f"{int(value):+d}"
    if abs(value) < 1e-3 or abs(value) >= 1e4:
        return f"{value:+.2e}"
    return f"{value:+.4f}"


def _get(d: dict[str, Any] | None, *path: str) -> float | None:
    for key in path:
        if d is None:
            return None
        d = d.get(key)
    return None if d is None else float(d)  # type: ignore[arg-type]


def summary_rows(results: dict[str, Any]) -> list[Row]:
    """The side-by-side rows of a study's results."""
    saes = results["saes"]
    lin = saes["linear"]
    comparisons: dict[str, dict[str, dict[str, Any]]] = results.get("comparisons", {})

    def row(metric: str, better: Better, *path: str, judged: bool = True) -> Row:
        key = ".".join(path) if judged else ""
        intervals = {
            other: Interval(**by_metric[key])
            for other, by_metric in comparisons.items()
            if key in by_metric
        }
        values = {name: _get(sae, *path) for name, sae in saes.items()}
        return Row(metric, values, better, intervals or None)

    rows = [
        row("MSE (held out)", "lower", "mse"),
        row("explained variance", "higher", "explained_variance"),
        row("L0", "none", "l0"),
        # No verdict: a bootstrap of a never-fires count is biased (a resample holds
        # about 63% of the distinct samples, so rare latents look dead in it).
        row("dead latents", "lower", "dead_latents", judged=False),
        row("atom recovery (MCC)", "higher", "mcc"),
        row("composition as a latent (best cos)", "higher", "composite_latent_cosine"),
        row("interaction direction (best cos)", "higher", "interaction_best_cosine"),
        row("interaction direction (atom-matched cos)", "higher", "interaction_matched_cosine"),
        row("learned vs planted strength (Spearman)", "higher", "strength_correlation", "spearman"),
        row(
            "interaction strength vs co-occurrence (Pearson)",
            "closer_to_zero",
            "cooccurrence",
            "interaction_vs_cooccurrence",
            "pearson",
        ),
        row(
            "latent covariance vs co-occurrence (Pearson)",
            "none",
            "cooccurrence",
            "covariance_vs_cooccurrence",
            "pearson",
        ),
    ]
    ks = sorted(int(key[4:]) for key in lin.get("probing", {}) if key.startswith("f1_k"))
    rows += [row(f"composition probe F1, k={k}", "higher", "probing", f"f1_k{k}") for k in ks]
    rows += [
        row("composition Wasserstein-1 (raw)", "higher", "probing", "wasserstein"),
        row(
            "composition Wasserstein-1 (standardized)",
            "higher",
            "probing",
            "wasserstein_standardized",
        ),
        row("parameters", "none", "n_parameters"),
    ]
    return rows


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if math.isnan(value):
        return "nan"
    if value == int(value) and (abs(value) >= 1 or value == 0):
        return f"{int(value)}"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.4f}"


def format_table(rows: list[Row]) -> str:
    """A Markdown table (also readable as plain text); ``better`` compares the
    PolySAE with the linear SAE, and the last column is the noise interval of
    that difference."""
    width = max(len(r.metric) for r in rows)
    names = [name for name in SAE_LABELS if name in rows[0].values]
    cols = [max(len(SAE_LABELS[n]), 10) for n in names]
    verdicts = [verdict(r) for r in rows]
    intervals = [_fmt_interval(r.interval()) for r in rows]
    vw = max(len("better"), *(len(v) for v in verdicts))
    iw = max(len(INTERVAL_TITLE), *(len(i) for i in intervals))
    header = "".join(f" {SAE_LABELS[n]:>{c}} |" for n, c in zip(names, cols, strict=True))
    rule = "".join(f"{'-' * (c + 1)}:|" for c in cols)
    lines = [
        f"| {'metric':<{width}} |{header} {'better':<{vw}} | {INTERVAL_TITLE:<{iw}} |",
        f"|{'-' * (width + 2)}|{rule}{'-' * (vw + 2)}|{'-' * (iw + 2)}|",
    ]
    for r, v, i in zip(rows, verdicts, intervals, strict=True):
        cells = "".join(f" {_fmt(r.values[n]):>{c}} |" for n, c in zip(names, cols, strict=True))
        lines.append(f"| {r.metric:<{width}} |{cells} {v:<{vw}} | {i:<{iw}} |")
    return "\n".join(lines)


INTERVAL_TITLE = "PolySAE - linear [95% interval]"


def _losses(rows: list[Row]) -> list[str]:
    return [
        f"{r.metric}: {verdict(r)}, PolySAE - linear {_fmt_interval(r.interval())}"
        for r in rows
        if r.winner() in ("linear", "tie", "unjudged")
    ]


def _ablation_lines(rows: list[Row]) -> list[str]:
    def listed(which: str) -> str:
        items = [
            f"{r.metric} ({_fmt_interval(r.interval('poly_order1'))})"
            for r in rows
            if r.winner("poly_order1", "poly") == which
        ]
        return ", ".join(items) or "none"

    return [
        "",
        "## What the polynomial terms add (PolySAE vs its order-1 ablation)",
        "",
        "PolySAE - order 1 with its 95% interval in brackets.",
        "",
        "- better with the polynomial terms: " + listed("poly"),
        "- better without them: " + listed("poly_order1"),
        "- tie (within noise): " + listed("tie"),
        f"- not judged (fewer than {MIN_UNITS} units): " + listed("unjudged"),
    ]


def _corr(d: dict[str, Any] | None) -> str:
    if not d:
        return "n/a"
    return f"Pearson {d['pearson']:.3f}, Spearman {d['spearman']:.3f} over {d['n']} pairs"


def markdown_report(results: dict[str, Any]) -> str:
    """The full Markdown report (with the in-class study's section when ``results``
    hold an ``"inclass"`` part)."""
    cfg, gt = results["config"], results["ground_truth"]
    gcfg = cfg["ground_truth"]
    rows = summary_rows(results)
    losses = _losses(rows)
    lin, poly = results["saes"]["linear"], results["saes"]["poly"]
    lines = [
        "# PolySAE vs a linear TopK SAE on compositional ground truth",
        "",
        "All SAEs were trained by SAELens's trainer with the same width "
        f"(d_sae {cfg['d_sae']}), k ({cfg['k']}), learning rate ({cfg['lr']}), "
        f"batch ({cfg['batch_size']}) and samples ({cfg['training_samples']:,}), seed "
        f"{cfg['seed']}. Data: {gcfg['num_atoms']} atoms in d_in {gcfg['d_in']} "
        f"(true L0 {gt['true_l0']:.2f}), {gcfg['num_interacting_pairs']} planted "
        f"interacting pairs and {gcfg['num_decoy_pairs']} co-firing decoy pairs; the "
        f"interaction terms carry {100 * gt['interaction_energy_share']:.1f}% of the "
        "activations' energy. Metrics on "
        f"{cfg['eval_samples']:,} held-out samples.",
        "",
        format_table(rows),
        "",
        "`better` compares PolySAE with the linear TopK SAE: a side wins only when the "
        f"95% paired bootstrap interval of the difference ({cfg.get('n_boot', 'n/a')} "
        "resamples of the held-out samples, atoms, planted pairs or composition tasks "
        "the metric averages over) excludes 0; otherwise it is a `tie (within noise)`. "
        "The interval covers evaluation noise only, not seed-to-seed training "
        "variance: one seed's win is not a result that holds across seeds. "
        "Dead latents get no verdict: a bootstrap of a count of never-firing latents "
        "is biased (rare latents look dead in a resample). "
        f"Rows whose metric averages fewer than {MIN_UNITS} units (the composition "
        "tasks) are `not judged`. "
        "Blank rows are descriptive or apply to one SAE only. PolySAE order 1 is an "
        "ablation: the same U @ C1 parametrisation, initialisation and Stiefel "
        "retraction, without the quadratic and cubic terms.",
        "",
        "## Where PolySAE does not win",
        "",
    ]
    if losses:
        lines += [f"- {m}" for m in losses]
    else:
        lines.append("- PolySAE is better beyond noise on every comparable metric in this run.")
    if "poly_order1" in results["saes"]:
        lines += _ablation_lines(rows)
    lines += [
        "",
        "## Interactions and co-occurrence",
        "",
        "- Ground truth, planted strength vs co-firing frequency of the interacting "
        f"pairs: {_corr(gt['strength_vs_cofire_frequency'])} (independent by design).",
        "- PolySAE, learned strength of the atom-matched latent pairs vs planted "
        f"strength (decoys count as 0): {_corr(poly.get('strength_correlation'))}.",
        "- PolySAE, interaction strength vs co-occurrence over co-firing latent "
        f"pairs: {_corr(poly['cooccurrence'].get('interaction_vs_cooccurrence'))}.",
        "- Linear SAE, latent covariance vs co-occurrence (the paper's baseline): "
        f"{_corr(lin['cooccurrence']['covariance_vs_cooccurrence'])}.",
        "- PolySAE, latent covariance vs co-occurrence: "
        f"{_corr(poly['cooccurrence']['covariance_vs_cooccurrence'])}.",
        "",
        f"![learned vs planted strength]({PLOT_FILES['strength']})",
        "",
        f"![interaction strength vs co-occurrence]({PLOT_FILES['cooccurrence']})",
        "",
        "## Decoder terms",
        "",
        "Share of the reconstruction's energy (sum of squares over a batch) by term, "
        "PolySAE at the end of training: "
        + ", ".join(f"{k} {_fmt(v)}" for k, v in poly.get("term_shares", {}).items())
        + f". U orthogonality error: {poly.get('orthogonality_error', float('nan')):.1e}.",
        "",
        f"![decoder term shares]({PLOT_FILES['terms']})",
        "",
        "## Definitions",
        "",
        "- Interaction direction of latents i, j: the decoder's mixed second derivative "
        "at z = 0, v_ij = 2 lambda2 sum_r U[i,r] U[j,r] C2[r]; strength B_ij = ||v_ij||.",
        "- Atom-matched: each atom is matched to the latent whose first-order decoder "
        "row has the largest |cosine| with it.",
        "- Composition tasks: label 1 when both atoms of an interacting pair fire, 0 "
        "when exactly one does; probe and Wasserstein as in the paper's protocol, "
        "averaged over tasks.",
        "",
        "Runtime: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in results.get("runtime_seconds", {}).items())
        + ".",
    ]
    text = "\n".join(lines) + "\n"
    if "inclass" in results:
        from polysae_lens.inclass_report import markdown_section

        text += markdown_section(results, rows)
    return text


def _plot_strength(results: dict[str, Any], ax: Any) -> None:
    matched = results["saes"]["poly"].get("matched_pairs")
    if not matched:
        ax.text(0.5, 0.5, "PolySAE of order 1: no interactions", ha="center")
        return
    planted, learned = matched["planted_strength"], matched["learned_strength"]
    inter = matched["interacting"]
    xs_i = [p for p, m in zip(planted, inter, strict=True) if m]
    ys_i = [v for v, m in zip(learned, inter, strict=True) if m]
    ys_d = [v for v, m in zip(learned, inter, strict=True) if not m]
    ax.scatter(xs_i, ys_i, label="interacting pairs", color="tab:blue")
    ax.scatter([0.0] * len(ys_d), ys_d, label="decoys (co-fire, no interaction)", color="tab:red")
    corr = results["saes"]["poly"]["strength_correlation"]
    ax.set_xlabel("planted strength s_p")
    ax.set_ylabel("learned strength B_ij of the atom-matched latents")
    ax.set_title(f"PolySAE: learned vs planted (Spearman {corr['spearman']:.2f})")
    ax.legend()


def _plot_cooccurrence(results: dict[str, Any], axes: Any) -> None:
    panels: list[tuple[str, str, str, str]] = [
        ("poly", "interaction_strength", "interaction_vs_cooccurrence", "PolySAE B_ij"),
        ("linear", "covariance", "covariance_vs_cooccurrence", "linear SAE latent covariance"),
    ]
    for ax, (name, key, corr_key, label) in zip(axes, panels, strict=True):
        co = results["saes"][name]["cooccurrence"]
        ys = co["scatter"].get(key)
        if ys is None:
            ax.text(0.5, 0.5, "n/a", ha="center")
            continue
        ax.scatter(co["scatter"]["frequency"], ys, s=4, alpha=0.4)
        ax.set_xscale("log")
        ax.set_xlabel("co-occurrence frequency")
        ax.set_ylabel(label)
        r = co[corr_key]
        ax.set_title(f"{label}\nPearson {r['pearson']:.2f}, Spearman {r['spearman']:.2f}")


def _plot_terms(results: dict[str, Any], axes: Any) -> None:
    curve = results["curves"]["poly"]
    samples = [p["samples"] for p in curve]
    for term in ("linear", "quadratic", "cubic"):
        if term in curve[-1]["term_shares"]:
            axes[0].plot(samples, [p["term_shares"][term] for p in curve], marker="o", label=term)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("training samples")
    axes[0].set_ylabel("share of reconstruction energy")
    axes[0].set_title("PolySAE decoder terms over training")
    axes[0].legend()
    for name, c in results["curves"].items():
        axes[1].plot(
            [p["samples"] for p in c],
            [p["explained_variance"] for p in c],
            marker="o",
            label=SAE_LABELS.get(name, name),
        )
    axes[1].set_xlabel("training samples")
    axes[1].set_ylabel("explained variance (held out)")
    axes[1].set_title("Reconstruction over training")
    axes[1].legend()


def write_plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """The three PNG plots of :data:`PLOT_FILES`, and the in-class study's training
    plot when ``results`` hold one (:mod:`polysae_lens.inclass_report`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    makers: dict[str, tuple[tuple[int, int], Callable[[dict[str, Any], Any], None]]] = {
        "strength": ((1, 1), _plot_strength),
        "cooccurrence": ((1, 2), _plot_cooccurrence),
        "terms": ((1, 2), _plot_terms),
    }
    paths = []
    for key, ((nrows, ncols), draw) in makers.items():
        fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.5))
        draw(results, axes)
        fig.tight_layout()
        path = out_dir / PLOT_FILES[key]
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    if "inclass" in results:
        from polysae_lens.inclass_report import write_plot

        paths.append(write_plot(results["inclass"], out_dir))
    return paths


def write_outputs(results: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write ``results.json``, ``report.md`` and the plots into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "results.json"
    json_path.write_text(json.dumps(results, indent=2, allow_nan=True))
    report_path = out / "report.md"
    report_path.write_text(markdown_report(results))
    return [json_path, report_path, *write_plots(results, out)]
