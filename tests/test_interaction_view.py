"""The interaction view: its data step against hand-checkable facts, its HTML, and
the page in a real headless Chromium (Debian's ``chromium``; skipped without it)."""

from __future__ import annotations

import html
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import TrainingSAE

from polysae_lens.analysis import interaction_direction, top_partners
from polysae_lens.interaction_view import (
    InteractionView,
    LatentView,
    PairExample,
    PartnerView,
    TokenLogit,
    direct_logits,
    interaction_view_data,
    render_interaction_view,
    write_interaction_view,
)
from tests.conftest import D_SAE, make_training_sae
from tests.lm_fixtures import TEXTS, make_tiny_model

HOOK = "blocks.0.hook_resid_post"
LATENTS = [3, 7]
N_PARTNERS, N_LOGITS, N_EXAMPLES = 4, 5, 3


@pytest.fixture(scope="module")
def model() -> Any:
    return make_tiny_model()


@pytest.fixture(scope="module")
def sae() -> Any:
    # k = 12 of 48 latents: pairs co-fire often enough to have examples.
    sae = make_training_sae("poly", k=12)
    sae.cfg.metadata.hook_name = HOOK
    sae.eval()
    return sae


@pytest.fixture(scope="module")
def tokens(model: Any) -> torch.Tensor:
    return model.to_tokens(TEXTS[:20])  # [20, ctx], BOS first, PAD-padded


@pytest.fixture(scope="module")
def view(sae: Any, model: Any, tokens: torch.Tensor) -> InteractionView:
    return interaction_view_data(
        sae,
        model,
        tokens,
        LATENTS,
        n_partners=N_PARTNERS,
        n_logits=N_LOGITS,
        n_examples=N_EXAMPLES,
        batch_size=6,
    )


@pytest.fixture(scope="module")
def latents_BSF(sae: Any, model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """SAE latents of every token, computed independently of the module."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        acts_BSD = cache[HOOK]
        return sae.encode(acts_BSD.reshape(-1, acts_BSD.shape[-1])).reshape(*tokens.shape, -1)


def _special_mask(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    tok = model.tokenizer
    special = [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]
    return torch.isin(tokens, torch.tensor([s for s in special if s is not None]))


# ---------------------------------------------------------------------------
# Data step
# ---------------------------------------------------------------------------


def test_partners_are_top_partners_strongest_first(view: InteractionView, sae: Any) -> None:
    assert [lv.latent for lv in view.latents] == LATENTS
    for lv in view.latents:
        expected = top_partners(sae, lv.latent, N_PARTNERS)
        assert [pv.partner for pv in lv.partners] == expected.pairs_P2[:, 1].tolist()
        strengths = [pv.strength for pv in lv.partners]
        assert strengths == pytest.approx(expected.strength_P.tolist())
        assert strengths == sorted(strengths, reverse=True)
        assert lv.latent not in [pv.partner for pv in lv.partners]


def test_logits_are_the_interaction_direction_through_W_U(
    view: InteractionView, sae: Any, model: Any
) -> None:
    for lv in view.latents:
        for pv in lv.partners:
            logits_V = interaction_direction(sae, lv.latent, pv.partner).detach() @ model.W_U
            order = logits_V.argsort(descending=True)
            top_ids, bottom_ids = order[:N_LOGITS].tolist(), order.flip(0)[:N_LOGITS].tolist()
            assert pv.top_logits is not None and pv.bottom_logits is not None
            assert [r.token_id for r in pv.top_logits] == top_ids
            assert [r.token_id for r in pv.bottom_logits] == bottom_ids
            assert [r.logit for r in pv.top_logits] == pytest.approx(
                logits_V[top_ids].tolist(), rel=1e-5
            )
            assert [r.logit for r in pv.bottom_logits] == pytest.approx(
                logits_V[bottom_ids].tolist(), rel=1e-5
            )
            assert [r.token for r in pv.top_logits] == model.to_str_tokens(torch.tensor(top_ids))
    assert "direct path" in view.logits_note


def test_direct_logits_small_case() -> None:
    v_PD = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    W_U_DV = torch.tensor([[3.0, -1.0, 2.0], [0.0, 5.0, 1.0]])  # logits [3,-1,2], [0,-5,-1]
    tv, ti, bv, bi = direct_logits(v_PD, W_U_DV, 2)
    assert ti.tolist() == [[0, 2], [0, 2]] and tv.tolist() == [[3.0, 2.0], [0.0, -1.0]]
    assert bi.tolist() == [[1, 2], [1, 2]] and bv.tolist() == [[-1.0, 2.0], [-5.0, -1.0]]
    with pytest.raises(ValueError, match=r"n \(logits per table\) must be >= 1, got 0"):
        direct_logits(v_PD, W_U_DV, 0)


def test_examples_really_cofire_and_are_the_strongest(
    view: InteractionView, model: Any, tokens: torch.Tensor, latents_BSF: torch.Tensor
) -> None:
    special_BS = _special_mask(model, tokens)
    n_with_examples = 0
    for lv in view.latents:
        z_i = latents_BSF[..., lv.latent]
        assert lv.n_fire == int(((z_i != 0) & ~special_BS).sum())
        for pv in lv.partners:
            z_j = latents_BSF[..., pv.partner]
            both_BS = (z_i != 0) & (z_j != 0) & ~special_BS
            assert pv.n_cofire == int(both_BS.sum())
            best = (z_i * z_j)[both_BS].sort(descending=True).values[:N_EXAMPLES]
            assert [ex.score for ex in pv.examples] == pytest.approx(best.tolist(), rel=1e-5)
            n_with_examples += bool(pv.examples)
            for ex in pv.examples:
                s, p = ex.seq_index, ex.position
                assert float(z_i[s, p]) != 0 and float(z_j[s, p]) != 0
                assert not bool(special_BS[s, p])
                assert ex.score == pytest.approx(float(z_i[s, p] * z_j[s, p]), rel=1e-5)
                window = slice(ex.window_start, ex.window_start + len(ex.tokens))
                assert ex.token_ids == tokens[s, window].tolist()
                assert ex.tokens == model.to_str_tokens(tokens[s, window])
                assert ex.acts_latent == pytest.approx(z_i[s, window].tolist(), abs=1e-6)
                assert ex.acts_partner == pytest.approx(z_j[s, window].tolist(), abs=1e-6)
                assert ex.tokens[ex.center] == ex.tokens[p - ex.window_start]
                assert 0 <= ex.center <= 12 and len(ex.tokens) - ex.center - 1 <= 4
    assert n_with_examples >= 4, "the fixture should give several pairs with examples"


def test_batches_give_the_same_view(
    sae: Any, model: Any, tokens: torch.Tensor, view: InteractionView
) -> None:
    uneven = [tokens[:7], tokens[7:8], tokens[8:]]
    again = interaction_view_data(
        sae,
        model,
        iter(uneven),
        LATENTS,
        n_partners=N_PARTNERS,
        n_logits=N_LOGITS,
        n_examples=N_EXAMPLES,
    )
    assert again == view
    assert (view.n_sequences, view.hook_name) == (20, HOOK)


def test_json_round_trip(view: InteractionView) -> None:
    assert InteractionView.from_dict(json.loads(view.to_json())) == view


def test_no_tokens_no_examples(sae: Any, model: Any) -> None:
    view = interaction_view_data(sae, model, None, 5, n_partners=2)
    assert (view.n_tokens, view.n_sequences) == (0, 0)
    (lv,) = view.latents
    assert lv.n_fire == 0 and all(not pv.examples and pv.n_cofire == 0 for pv in lv.partners)
    assert all(pv.top_logits for pv in lv.partners)


def test_no_logits_without_a_direct_path(model: Any) -> None:
    sae = make_training_sae("poly", d_in=64, k=12)  # reads the MLP's hidden layer (d_mlp 64)
    sae.eval()
    view = interaction_view_data(
        sae, model, model.to_tokens(TEXTS[:4]), [0], hook_name="blocks.0.mlp.hook_post"
    )
    assert "64" in view.logits_note and "16" in view.logits_note
    assert all(
        pv.top_logits is None and pv.bottom_logits is None for pv in view.latents[0].partners
    )
    assert any(pv.examples for pv in view.latents[0].partners)


def test_bad_inputs_raise_clear_errors(sae: Any, model: Any, tokens: torch.Tensor) -> None:
    linear = TrainingSAE.from_dict({"architecture": "topk", "d_in": 16, "d_sae": 48, "k": 4})
    with pytest.raises(TypeError, match="PolySAE"):
        interaction_view_data(linear, model, None, [0])
    with pytest.raises(ValueError, match="poly_order=1"):
        interaction_view_data(make_training_sae("poly", order=1), model, None, [0])
    with pytest.raises(IndexError, match=f"allowed 0..{D_SAE - 1}"):
        interaction_view_data(sae, model, None, [D_SAE])
    with pytest.raises(ValueError, match="latents is empty"):
        interaction_view_data(sae, model, None, [])
    with pytest.raises(ValueError, match="n_partners must be >= 1, got 0"):
        interaction_view_data(sae, model, None, [0], n_partners=0)
    with pytest.raises(ValueError, match=r"\[n_seq, ctx\]"):
        interaction_view_data(sae, model, tokens[0], [0])
    with pytest.raises(ValueError, match="not a hook point"):
        interaction_view_data(sae, model, tokens, [0], hook_name="blocks.9.hook_nothing")
    no_hook = make_training_sae("poly")
    with pytest.raises(ValueError, match="pass hook_name="):
        interaction_view_data(no_hook, model, tokens, [0])


# ---------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------

NASTY = ["<script>alert(1)</script>", "\"quoted\" & 'single'", "</script><b>x</b>", "\n\t\x7f"]


def nasty_view() -> InteractionView:
    """A hand-made view whose tokens and title would break naive HTML."""
    example = PairExample(
        seq_index=0,
        position=2,
        score=0.5,
        window_start=0,
        tokens=NASTY,
        token_ids=[10, 11, 12, 13],
        acts_latent=[0.0, 1.0, 0.5, 0.0],
        acts_partner=[0.2, 0.0, 1.0, 0.0],
    )
    logits = [TokenLogit(token=t, token_id=10 + k, logit=1.0 - k) for k, t in enumerate(NASTY)]
    partner = PartnerView(
        partner=42,
        strength=0.25,
        n_cofire=1,
        top_logits=logits,
        bottom_logits=logits[::-1],
        examples=[example],
    )
    return InteractionView(
        title="<b>bold</b> & co",
        hook_name="blocks.0.hook_resid_post",
        model_name='m"odel',
        d_sae=48,
        n_sequences=1,
        n_tokens=4,
        logits_note="note <i>",
        latents=[LatentView(latent=5, n_fire=2, partners=[partner])],
    )


def _embedded_data(page: str) -> Any:
    match = re.search(r'<script type="application/json" id="view-data">(.*?)</script>', page, re.S)
    assert match is not None
    return json.loads(match.group(1))


def test_html_escapes_text_and_embeds_the_data() -> None:
    view = nasty_view()
    page = render_interaction_view(view)
    assert page.count("<script") == 2  # the JSON data block and the code, nothing else
    assert "</script><b>" not in page and "<b>bold" not in page and "<i>" not in page
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; co" in page
    data = _embedded_data(page)
    tokens = data["latents"][0]["partners"][0]["examples"][0]["tokens"]
    assert tokens == NASTY
    assert InteractionView.from_dict(data) == view


def test_html_is_self_contained(view: InteractionView) -> None:
    page = render_interaction_view(view)
    assert not re.search(r"https?:|//[a-z]", page.replace("http-equiv", ""))
    assert not re.search(r"\b(src|href)\s*=\s*[\"'](?!data:|#)", page)
    assert "default-src 'none'" in html.unescape(page)


def test_write_interaction_view(tmp_path: Path, sae: Any, model: Any, tokens: torch.Tensor) -> None:
    path = tmp_path / "sub" / "view.html"
    view = write_interaction_view(sae, model, tokens[:4], [1], path, n_partners=2)
    page = path.read_text(encoding="utf-8")
    assert _embedded_data(page)["latents"][0]["latent"] == 1
    assert [pv.partner for pv in view.latents[0].partners] == _embedded_partners(page)


def _embedded_partners(page: str) -> list[int]:
    return [pv["partner"] for pv in _embedded_data(page)["latents"][0]["partners"]]


# ---------------------------------------------------------------------------
# A real browser: Debian's chromium, headless
# ---------------------------------------------------------------------------


def _find_chromium() -> str | None:
    """``$POLYSAE_CHROMIUM`` (a command or path) if set, else Debian's ``chromium``."""
    configured = os.environ.get("POLYSAE_CHROMIUM")
    if configured:
        return shutil.which(configured)
    return shutil.which("chromium") or shutil.which("/usr/bin/chromium")


CHROMIUM = _find_chromium()
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason=(
        f"chromium not found (POLYSAE_CHROMIUM={os.environ['POLYSAE_CHROMIUM']!r} is not an "
        "executable)"
        if os.environ.get("POLYSAE_CHROMIUM")
        else "chromium not found (no `chromium` on PATH, no /usr/bin/chromium)"
    )
    + ": browser tests skipped; install Debian's chromium (apt-get install chromium) or "
    "set POLYSAE_CHROMIUM to a Chromium executable to run them",
)


class LoadedPage:
    """A page opened in Chromium with everything it reported while loading."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.dialogs: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("request", lambda req: self.requests.append(req.url))
        page.on("dialog", self._dialog)

    def _console(self, msg: Any) -> None:
        if msg.type in ("error", "assert"):
            self.errors.append(f"console.{msg.type}: {msg.text}")

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None:
        pytest.skip("chromium not found")
    sync_api = pytest.importorskip(
        "playwright.sync_api",
        reason="playwright is not installed: pip install -e '.[dev]' (no browser download "
        "needed; the tests drive Debian's chromium)",
    )
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser: Any, path: Path) -> LoadedPage:
    page = browser.new_page()
    loaded = LoadedPage(page)
    page.goto(path.as_uri(), wait_until="load")
    page.wait_for_timeout(50)  # let late console messages arrive
    return loaded


@needs_chromium
def test_page_renders_in_chromium(browser: Any, tmp_path: Path, view: InteractionView) -> None:
    path = tmp_path / "view.html"
    path.write_text(render_interaction_view(view), encoding="utf-8")
    loaded = open_page(browser, path)
    page = loaded.page
    assert loaded.errors == []
    assert loaded.requests == [path.as_uri()]
    assert page.get_attribute("body", "data-rendered") == "true"
    for lv in view.latents:
        section = page.locator(f"section#latent-{lv.latent}")
        assert section.locator("h2").inner_text() == f"Latent {lv.latent}"
        shown = section.locator("tr.partner-row").evaluate_all(
            "rows => rows.map(r => Number(r.dataset.partner))"
        )
        assert shown == [pv.partner for pv in lv.partners]
    assert page.locator("nav a").all_inner_texts() == [f"#{lv.latent}" for lv in view.latents]
    # The first pair opens by default with its logit tables and examples.
    first = view.latents[0].partners[0]
    opened = page.locator("tr.details-row:not([hidden])")
    assert opened.count() == 1
    assert opened.locator("table.logits tr").count() == 2 * (N_LOGITS + 1)
    assert opened.locator(".example").count() == len(first.examples)
    assert opened.locator(".snippet span.hit").count() == len(first.examples)
    # Clicking another pair opens it.
    second = page.locator(f"section#latent-{LATENTS[1]} button.toggle").first
    second.click()
    assert second.get_attribute("aria-expanded") == "true"
    assert page.locator("tr.details-row:not([hidden])").count() == 2
    assert loaded.errors == []


@needs_chromium
def test_nasty_tokens_render_as_text_in_chromium(browser: Any, tmp_path: Path) -> None:
    path = tmp_path / "nasty.html"
    path.write_text(render_interaction_view(nasty_view()), encoding="utf-8")
    loaded = open_page(browser, path)
    page = loaded.page
    assert loaded.errors == [] and loaded.dialogs == []
    assert page.title() == "<b>bold</b> & co"
    snippet = page.locator(".snippet span").all_inner_texts()
    assert snippet[:3] == NASTY[:3]
    assert snippet[3] == "↵→\\x7f"  # control characters made visible
    assert page.locator("main b").count() == 0 and page.locator("main script").count() == 0


@needs_chromium
def test_negative_controls_errors_are_caught(
    browser: Any, tmp_path: Path, view: InteractionView
) -> None:
    """The browser checks must see a JS error, a console.error and a blocked
    network request; otherwise passing them would mean nothing."""
    broken = tmp_path / "broken.html"
    broken.write_text(
        "<!DOCTYPE html><html><body><p>x</p><script>notDefinedAnywhere();</script></body></html>",
        encoding="utf-8",
    )
    assert any("notDefinedAnywhere" in e for e in open_page(browser, broken).errors)

    logged = tmp_path / "logged.html"
    logged.write_text("<html><body><script>console.error('boom')</script></body></html>")
    assert any("boom" in e for e in open_page(browser, logged).errors)

    # Our page with a script edit that throws: detected, and nothing rendered.
    page = render_interaction_view(view).replace(
        'document.body.setAttribute("data-rendered", "true");', "null.boom;"
    )
    tampered = tmp_path / "tampered.html"
    tampered.write_text(page, encoding="utf-8")
    assert open_page(browser, tampered).errors  # CSP hash mismatch or the TypeError

    # An external resource slipped into the page is refused by its CSP, loudly.
    external = tmp_path / "external.html"
    external.write_text(
        render_interaction_view(view).replace(
            "<main", '<img src="http://192.0.2.1/x.png" alt=""><main'
        ),
        encoding="utf-8",
    )
    loaded = open_page(browser, external)
    assert any("Content Security Policy" in e for e in loaded.errors), loaded.errors


@needs_chromium
def test_dump_dom_shows_the_latents(tmp_path: Path, view: InteractionView) -> None:
    """Independently of playwright: ``chromium --headless --dump-dom`` runs the
    page's script and prints the DOM it built."""
    assert CHROMIUM is not None
    path = tmp_path / "view.html"
    path.write_text(render_interaction_view(view), encoding="utf-8")
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                "--dump-dom",
                path.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    assert 'data-rendered="true"' in out
    for lv in view.latents:
        assert f'<section class="latent" id="latent-{lv.latent}" data-latent="{lv.latent}">' in out
        assert f"<h2>Latent {lv.latent}</h2>" in out


def test_example_script_writes_a_page(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "interaction_view_example",
        Path(__file__).resolve().parents[1] / "examples" / "interaction_view.py",
    )
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(["--out", str(tmp_path / "v.html"), "--json", str(tmp_path / "v.json")])
    data = _embedded_data(out.read_text(encoding="utf-8"))
    assert len(data["latents"]) == 3 and data["hook_name"] == HOOK
    saved = InteractionView.from_dict(json.loads((tmp_path / "v.json").read_text()))
    assert [lv.latent for lv in saved.latents] == [lv["latent"] for lv in data["latents"]]
