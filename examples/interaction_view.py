"""Write a PolySAE interaction view (one self-contained HTML page) and optionally
screenshot it with headless Chromium.

Offline (default): a tiny random 2-layer transformer with a local tokenizer and a
random PolySAE (the test suite's helpers in ``tests/lm_fixtures.py`` and
``tests/conftest.py``) over 40 short sentences; it shows the page layout, not
meaningful features. This is how ``docs/images/interaction_view.png`` was made::

    python examples/interaction_view.py --out interaction_view.html \\
        --screenshot docs/images/interaction_view.png

With network access, a real model and a trained PolySAE (saved with
``save_inference_model``, or a SAELens release)::

    python examples/interaction_view.py --model gpt2 --sae-path out/poly \\
        --texts my_texts.txt --latents 123 456 --out view.html
    python examples/interaction_view.py --model gpt2 --release RELEASE --sae-id ID

Without ``--latents`` the page shows the latents of the strongest interacting
pairs among the latents that fire on the texts.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

import polysae_lens  # noqa: F401  (registers the PolySAE architectures)
from polysae_lens.analysis import top_interacting_pairs
from polysae_lens.interaction_view import write_interaction_view

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="interaction_view.html", help="HTML file to write")
    parser.add_argument("--json", default=None, help="also save the view's data as JSON here")
    parser.add_argument("--screenshot", default=None, help="PNG to render the page to")
    parser.add_argument("--window", default="960,1180", help="screenshot size WIDTH,HEIGHT")
    parser.add_argument("--latents", type=int, nargs="*", default=None, help="latents to show")
    parser.add_argument("--n-latents", type=int, default=3, help="latents picked without --latents")
    parser.add_argument("--n-partners", type=int, default=6)
    parser.add_argument("--n-logits", type=int, default=10)
    parser.add_argument("--n-examples", type=int, default=4)
    parser.add_argument("--model", default=None, help="TransformerLens model name (network)")
    parser.add_argument("--sae-path", default=None, help="directory of a saved PolySAE")
    parser.add_argument("--release", default=None, help="SAELens release of a PolySAE")
    parser.add_argument("--sae-id", default=None, help="SAE id within --release")
    parser.add_argument("--texts", default=None, help="text file, one example text per line")
    parser.add_argument("--context", type=int, default=128, help="tokens per text (real models)")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def offline_model_and_sae() -> tuple[Any, Any, list[str]]:
    """The test suite's tiny offline transformer and a random order-3 PolySAE on it."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.conftest import make_training_sae
    from tests.lm_fixtures import TEXTS, make_tiny_model

    model = make_tiny_model()
    sae = make_training_sae("poly", k=12)
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    sae.cfg.metadata.model_name = "tiny random transformer (offline demo)"
    return model, sae.eval(), list(TEXTS)


def real_model_and_sae(args: argparse.Namespace) -> tuple[Any, Any, list[str]]:
    """A pretrained model and a saved or released PolySAE (needs network for the model)."""
    from sae_lens import SAE, HookedSAETransformer

    if args.sae_path:
        sae = SAE.load_from_disk(args.sae_path, device=args.device)
    elif args.release and args.sae_id:
        sae = SAE.from_pretrained(args.release, args.sae_id, device=args.device)
    else:
        raise SystemExit("--model needs --sae-path, or --release with --sae-id")
    model = HookedSAETransformer.from_pretrained(args.model, device=args.device)
    if args.texts:
        texts = [line for line in Path(args.texts).read_text().splitlines() if line.strip()]
    else:
        texts = [
            "The cat sat on the mat while the dog slept by the fire.",
            "Stock markets fell sharply after the central bank raised interest rates.",
            "def add(a, b):\n    return a + b",
            "She did not like the film at all, but her friends loved it.",
        ]
    return model, sae.eval(), texts


def pick_latents(sae: Any, model: Any, tokens_BS: torch.Tensor, n: int) -> list[int]:
    """Latents of the strongest interacting pairs among those that fire on the tokens."""
    hook = sae.cfg.metadata.hook_name
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens_BS, names_filter=[hook])
        acts = cache[hook]
        z = sae.encode(acts.reshape(-1, acts.shape[-1]).to(sae.dtype))
    live = (z != 0).any(0).nonzero().flatten()
    pairs = top_interacting_pairs(sae, n=4 * n, latents=live).pairs_P2.flatten().tolist()
    return list(dict.fromkeys(pairs))[:n]


def screenshot(html_path: Path, png_path: Path, window: str) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("--screenshot needs chromium (Debian: apt-get install chromium)")
    png_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                chromium,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={window}",
                f"--screenshot={png_path.resolve()}",
                html_path.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    with torch.no_grad():
        return _run(args)


def _run(args: argparse.Namespace) -> Path:
    if args.model:
        model, sae, texts = real_model_and_sae(args)
        tokens = model.to_tokens(texts)[:, : args.context]
    else:
        model, sae, texts = offline_model_and_sae()
        tokens = model.to_tokens(texts)
    latents = args.latents or pick_latents(sae, model, tokens, args.n_latents)
    out = Path(args.out)
    view = write_interaction_view(
        sae,
        model,
        tokens,
        latents,
        out,
        n_partners=args.n_partners,
        n_logits=args.n_logits,
        n_examples=args.n_examples,
    )
    if args.json:
        Path(args.json).write_text(view.to_json(indent=1), encoding="utf-8")
    if args.screenshot:
        screenshot(out, Path(args.screenshot), args.window)
        logging.getLogger(__name__).info("screenshot: %s", args.screenshot)
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
