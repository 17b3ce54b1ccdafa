"""``results.json`` -> the Markdown table (laid out like the paper's Table 1) and plots.

Pure functions of the results document, except :func:`write_report` and
:func:`write_plots`, which write files.

The paper's per-model Table 1 values are not in this repository's reference
notes (``polysae-paper-summary.md``, ``method-notes.md``), so the paper's rows say
"n/a (not in our reference)"; the notes do give the paper's headline summary
(+8% mean probing F1 over linear SAEs across 4 models x 3 sparsifiers; 2-10x
Wasserstein distances; comparable MSE and CE loss), which is shown beside our
ratios.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from polysae_lens.reproduce.plan import atomic_write_json, atomic_write_text, format_duration

__all__ = ["NOT_IN_REFERENCE", "PAPER_REFERENCE", "format_table", "write_plots", "write_report"]

NOT_IN_REFERENCE = "n/a (not in our reference)"

PAPER_REFERENCE: dict[str, Any] = {
    "table1": None,
    "table1_note": (
        "The paper's per-model Table 1 numbers are not in this repository's reference "
        "notes; only its headline claims are."
    ),
    "claims": {
        "probing_f1": "PolySAE +8% mean probing F1 over linear SAEs (4 models x 3 sparsifiers)",
        "wasserstein": "2-10x larger Wasserstein distances",
        "reconstruction": "reconstruction MSE and CE loss comparable to linear SAEs",
    },
    "summaries": {
        "probing_f1": "mean over classes, then over datasets (8: bias_in_bios sets separate)",
        "wasserstein": "median over classes, then median over datasets",
    },
    "source": "arXiv 2602.01322 via docs reference notes (polysae-paper-summary.md, method-notes.md)",
}
"""What the table may quote from the paper: only what the reference notes give."""

SAE_LABELS = {"linear": "linear", "poly": "PolySAE"}


def _columns(k_values: list[int]) -> list[tuple[str, str, str]]:
    """(header, summary key, format) of each metric column."""
    cols = [(f"F1@{k}", f"f1_k{k}", ".4f") for k in k_values]
    cols += [
        ("W1 (median of medians)", "wasserstein_median", ".4g"),
        ("MSE", "mse", ".4g"),
        ("expl. var.", "explained_variance", ".4f"),
        ("ΔCE loss", "ce_loss_increase", ".4f"),
    ]
    return cols


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, fmt)


def _ratio(a: Any, b: Any) -> str:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or b == 0:
        return "n/a"
    return f"{a / b:.3f}×"


def _settings_text() -> str:
    """``PAPER_TRAINING_SETTINGS`` as ``name=value`` pairs."""
    # imported here: the config module loads SAELens, and this module stays light
    from polysae_lens.config import PAPER_TRAINING_SETTINGS

    return ", ".join(f"{k}={v!r}" for k, v in PAPER_TRAINING_SETTINGS.items())


def format_table(results: dict[str, Any], *, title: str | None = None) -> str:
    """The Markdown report: the Table-1-style table, the paper's summary row and notes."""
    plan = results["plan"]
    setting = plan["setting"]
    k_values = plan["k_values"]
    cols = _columns(k_values)
    model = f"{setting['name']} ({setting['hook_name']})"
    header = ["model", "sparsifier", "SAE", *(c[0] for c in cols)]
    lines = []
    if title:
        lines += [f"## {title}", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    saes = results["saes"]
    first = True
    for kind in ("linear", "poly"):
        summary = saes[kind]["summary"]
        cells = [_cell(summary.get(key), fmt) for _, key, fmt in cols]
        lead = [model, plan["sparsifier"]] if first else ["", ""]
        first = False
        lines.append("| " + " | ".join([*lead, f"{SAE_LABELS[kind]} (ours)", *cells]) + " |")
    ratios = [
        _ratio(saes["poly"]["summary"].get(key), saes["linear"]["summary"].get(key))
        for _, key, _ in cols
    ]
    lines.append("| " + " | ".join(["", "", "PolySAE / linear (ours)", *ratios]) + " |")
    for kind in ("linear", "poly"):
        lines.append(
            "| "
            + " | ".join(["", "", f"{SAE_LABELS[kind]} (paper)", *([NOT_IN_REFERENCE] * len(cols))])
            + " |"
        )
    f1_claim = "+8% (≈1.08×)"
    paper_row = ["all 4 models", "all 3", "PolySAE / linear (paper, mean)"]
    paper_row += [f1_claim] * len(k_values) + ["2-10×", "comparable", "n/a", "comparable"]
    lines.append("| " + " | ".join(paper_row) + " |")
    lines.append("")
    recipe = (
        f"the authors' recipe (`--paper-settings`: {_settings_text()})"
        if results["recipe"] == "paper"
        else 'the package\'s PolySAE training defaults (init_preset="package", C1 lr × sqrt(d_sae/R1))'
    )
    t = results["time"]
    gpu = (
        f", {format_duration(t['gpu_seconds'])} of GPU time"
        if t.get("gpu_seconds") is not None
        else ""
    )
    datasets = saes["poly"]["datasets"]
    lines += [
        f"- Training: {recipe}; both SAEs: {plan['training_tokens']:,} tokens, batch "
        f"{setting['batch_size_tokens']}, lr {setting['lr']} constant, d_sae {setting['d_sae']}, "
        f"k {setting['k']}, ranks {tuple([setting['d_in'], setting['interaction_rank'], setting['interaction_rank']])}, "
        f"seed {plan['seed']}, no decoder-norm rescaling, AuxK coefficient 1.",
        f"- F1@k: k-sparse probe, mean over classes then over {len(datasets)} dataset(s) "
        f"({', '.join(datasets)}); protocol {plan['protocol']}, {plan['n_train']} train / "
        f"{plan['n_test']} test texts per task. W1: mean over latents per task, median over "
        "classes, then median over datasets (the paper's summary).",
        "- MSE, explained variance and ΔCE loss (CE with the SAE spliced in minus without): "
        f"SAELens `run_evals` on {plan['eval_batches']} prompt batches of the training stream.",
        f"- Paper rows: {PAPER_REFERENCE['table1_note']} Its summary row quotes the headline claims.",
        f"- Time: {format_duration(t['total_seconds'])} on {t['device']}"
        + (f" × {t['world_size']} processes" if t["world_size"] > 1 else "")
        + gpu
        + ".",
    ]
    return "\n".join(lines) + "\n"


def write_plots(results: dict[str, Any], directory: Path) -> list[Path]:
    """Per-dataset probing F1 (largest k) and Wasserstein medians, PolySAE beside
    the linear SAE: ``plots/f1_per_dataset.png`` and ``plots/wasserstein_per_dataset.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    saes = results["saes"]
    datasets = saes["poly"]["datasets"]
    k = max(results["plan"]["k_values"])
    paths = []
    panels = (
        ("f1_per_dataset.png", f"probing/{{}}/f1_k{k}", f"probing F1 (k = {k})", False),
        ("wasserstein_per_dataset.png", "wasserstein/{}/median", "W1, median over classes", True),
    )
    for filename, key, label, log in panels:
        fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(datasets) + 2), 3.2))
        width = 0.38
        for i, kind in enumerate(("linear", "poly")):
            values = [saes[kind]["metrics"][key.format(d)] for d in datasets]
            xs = [j + (i - 0.5) * width for j in range(len(datasets))]
            ax.bar(xs, values, width, label=SAE_LABELS[kind])
        ax.set_xticks(range(len(datasets)), datasets, rotation=30, ha="right")
        ax.set_ylabel(label)
        if log and all(saes[k]["metrics"][key.format(d)] > 0 for k in saes for d in datasets):
            ax.set_yscale("log")  # W1 values of the two SAEs can differ 2-10x
        ax.legend()
        ax.set_title(f"{results['plan']['setting']['name']}, {results['plan']['sparsifier']}")
        fig.tight_layout()
        path = directory / filename
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(results: dict[str, Any], output_dir: Path) -> list[Path]:
    """Write ``results.json``, ``table.md`` and the plots into ``output_dir``."""
    atomic_write_json(output_dir / "results.json", results)
    atomic_write_text(output_dir / "table.md", format_table(results))
    return [
        output_dir / "results.json",
        output_dir / "table.md",
        *write_plots(results, output_dir / "plots"),
    ]
