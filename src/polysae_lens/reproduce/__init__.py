"""``polysae-lens reproduce``: the paper's PolySAE-vs-linear comparison in one command.

- :mod:`~polysae_lens.reproduce.settings`: the paper's four settings and three sparsifiers;
- :mod:`~polysae_lens.reproduce.plan`: the plan, its resume state, memory / disk estimates;
- :mod:`~polysae_lens.reproduce.run`: training, evaluation and resumption;
- :mod:`~polysae_lens.reproduce.table`: ``results.json`` -> Markdown table and plots;
- :mod:`~polysae_lens.reproduce.cli`: the subcommand's flags.

Importing this package loads no torch or SAELens.
"""

from polysae_lens.reproduce.plan import ReproducePlan, ReproduceState, estimate, sae_param_count
from polysae_lens.reproduce.settings import PAPER_SETTINGS, SPARSIFIERS, Setting, paper_setting

__all__ = [
    "PAPER_SETTINGS",
    "SPARSIFIERS",
    "ReproducePlan",
    "ReproduceState",
    "Setting",
    "estimate",
    "paper_setting",
    "sae_param_count",
]
