"""Interaction view: a self-contained HTML page about chosen PolySAE latents.

For each chosen latent the page lists its strongest interaction partners
(:func:`polysae_lens.analysis.top_partners`) and, for every (latent, partner)
pair, the tokens the interaction direction ``v_ij`` promotes and suppresses
through the model's unembedding, and the token positions of a corpus where
both latents fire, strongest first.

Two steps, usable separately:

- :func:`interaction_view_data` computes an :class:`InteractionView`: plain
  dataclasses of ints, floats and strings, JSON-serialisable
  (:meth:`InteractionView.to_json`, :meth:`InteractionView.from_dict`).
- :func:`render_interaction_view` turns one into a single HTML file with inline
  CSS, a small inline script and the data embedded as JSON. The page loads
  nothing from anywhere: its Content-Security-Policy allows only its own
  inline script and style (by hash) and ``data:`` images, so it views offline
  and a stray external reference would fail loudly in the browser console.

:func:`write_interaction_view` does both and writes the file.

Logit tables are the *direct path*: ``v_ij @ W_U`` with the model's unembedding,
skipping the final LayerNorm and every later layer, the same approximation as
the logit tables of SAE feature dashboards (``W_dec[i] @ W_U``). They exist
only when the SAE's ``d_in`` equals the model's ``d_model`` (residual-stream
hooks); otherwise they are left out (``None``) with a logged warning.

Shape suffixes: B sequences in a batch, S positions, D model dimension (d_in),
F SAE latents, C the latents involved in the view, P (latent, partner) pairs,
V vocabulary, K kept examples.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name, get_special_token_ids
from torch import Tensor, nn

from polysae_lens.analysis import interaction_direction, poly_weights, top_partners

logger = logging.getLogger(__name__)

__all__ = [
    "InteractionView",
    "LatentView",
    "PairExample",
    "PartnerView",
    "TokenLogit",
    "direct_logits",
    "interaction_view_data",
    "render_interaction_view",
    "write_interaction_view",
]


# ---------------------------------------------------------------------------
# Data structures
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenLogit:
    """One row of a logit table."""

    token: str
    """The token's text (decoded on its own)."""
    token_id: int
    """The token's id in the model's vocabulary."""
    logit: float
    """Direct-path logit effect ``(v_ij @ W_U)[token_id]`` per unit of ``z_i z_j``."""


@dataclass(frozen=True)
class PairExample:
    """A token position where both latents of a pair fire, with its context."""

    seq_index: int
    """Index of the sequence among all scanned sequences (in the order given)."""
    position: int
    """Position of the co-firing token within its sequence."""
    score: float
    """``z_latent * z_partner`` at ``position`` (examples are ranked by it)."""
    window_start: int
    """Position within the sequence of ``tokens[0]``; the co-firing token is
    ``tokens[position - window_start]``."""
    tokens: list[str]
    """The window's tokens, each decoded on its own."""
    token_ids: list[int]
    """The window's token ids."""
    acts_latent: list[float]
    """Activation of the chosen latent at every window token."""
    acts_partner: list[float]
    """Activation of the partner latent at every window token."""

    @property
    def center(self) -> int:
        """Index in ``tokens`` of the co-firing token."""
        return self.position - self.window_start


@dataclass(frozen=True)
class PartnerView:
    """A partner of a chosen latent: the pair's strength, logits and examples."""

    partner: int
    """The partner's latent index."""
    strength: float
    """Interaction strength ``B_ij = ||v_ij||`` (see :mod:`polysae_lens.analysis`)."""
    n_cofire: int
    """Scanned positions at which both latents fired."""
    top_logits: list[TokenLogit] | None
    """Most promoted tokens, largest logit first (``None``: no direct path)."""
    bottom_logits: list[TokenLogit] | None
    """Most suppressed tokens, most negative first (``None``: no direct path)."""
    examples: list[PairExample]
    """Co-firing positions, largest ``z_latent * z_partner`` first."""


@dataclass(frozen=True)
class LatentView:
    """A chosen latent and its strongest partners."""

    latent: int
    """The latent's index."""
    n_fire: int
    """Scanned positions at which the latent fired."""
    partners: list[PartnerView]
    """Partners, strongest interaction first."""


@dataclass(frozen=True)
class InteractionView:
    """Everything the interaction page shows; JSON-serialisable via :meth:`to_dict`."""

    title: str
    """Page title."""
    hook_name: str | None
    """Hook point the SAE reads (``None`` if no tokens were scanned)."""
    model_name: str | None
    """The model's name, if known."""
    d_sae: int
    """Number of SAE latents."""
    n_sequences: int
    """Sequences scanned for examples."""
    n_tokens: int
    """Positions scanned for examples (special tokens excluded if they were skipped)."""
    logits_note: str
    """How the logit tables were computed, or why there are none."""
    latents: list[LatentView]
    """The chosen latents, in the order asked for."""

    def to_dict(self) -> dict[str, Any]:
        """A dict of plain Python values (lists, ints, floats, strings, None)."""
        return asdict(self)

    def to_json(self, **kwargs: Any) -> str:
        """``json.dumps(self.to_dict(), **kwargs)``."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InteractionView:
        """Rebuild a view from :meth:`to_dict`'s output (e.g. after ``json.loads``)."""

        def logits(rows: list[dict[str, Any]] | None) -> list[TokenLogit] | None:
            return None if rows is None else [TokenLogit(**r) for r in rows]

        latents = [
            LatentView(
                latent=lv["latent"],
                n_fire=lv["n_fire"],
                partners=[
                    PartnerView(
                        partner=pv["partner"],
                        strength=pv["strength"],
                        n_cofire=pv["n_cofire"],
                        top_logits=logits(pv["top_logits"]),
                        bottom_logits=logits(pv["bottom_logits"]),
                        examples=[PairExample(**ex) for ex in pv["examples"]],
                    )
                    for pv in lv["partners"]
                ],
            )
            for lv in data["latents"]
        ]
        return cls(**{**data, "latents": latents})


# ---------------------------------------------------------------------------
# Data step
# ---------------------------------------------------------------------------


def direct_logits(v_PD: Tensor, W_U_DV: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top and bottom ``n`` direct-path logits of directions ``v_PD`` (pure).

    Returns ``(top_vals_Pn, top_ids_Pn, bottom_vals_Pn, bottom_ids_Pn)``: the
    largest entries of ``v_PD @ W_U_DV`` in decreasing order and the smallest in
    increasing order (most suppressed first), computed in float32.
    """
    if n < 1:
        raise ValueError(f"n (logits per table) must be >= 1, got {n}")
    if v_PD.shape[-1] != W_U_DV.shape[0]:
        raise ValueError(
            f"directions have dimension {v_PD.shape[-1]} but W_U has {W_U_DV.shape[0]} rows"
        )
    logits_PV = v_PD.float().to(W_U_DV.device) @ W_U_DV.float()
    m = min(n, logits_PV.shape[-1])
    top_vals, top_ids = logits_PV.topk(m, dim=-1)
    bot_vals, bot_ids = logits_PV.topk(m, dim=-1, largest=False)
    return top_vals, top_ids, bot_vals, bot_ids


def _token_decoder(model: Any) -> Callable[[Sequence[int]], list[str]]:
    """A function decoding token ids one by one with the model's tokenizer
    (``"<id>"`` placeholders if the model has none)."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        logger.warning("the model has no tokenizer: tokens are shown as <id>")
        return lambda ids: [f"<{i}>" for i in ids]

    def decode(ids: Sequence[int]) -> list[str]:
        unique = sorted(set(int(i) for i in ids))
        if not unique:
            return []
        texts = tokenizer.batch_decode([[i] for i in unique], clean_up_tokenization_spaces=False)
        lookup = dict(zip(unique, texts, strict=True))
        return [str(lookup[int(i)]) for i in ids]

    return decode


def _token_batches(tokens: Tensor | Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    if isinstance(tokens, Tensor):
        if tokens.ndim != 2:
            raise ValueError(
                f"tokens must be a [n_seq, ctx] tensor of token ids, got shape {tuple(tokens.shape)}"
            )
        yield from tokens.split(batch_size)
        return
    for batch in tokens:
        if not isinstance(batch, Tensor) or batch.ndim != 2:
            shape = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
            raise ValueError(f"each batch of tokens must be a [batch, ctx] tensor, got {shape}")
        yield batch


def _sae_device_dtype(sae: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(sae.parameters())
    return getattr(sae, "device", param.device), getattr(sae, "dtype", param.dtype)


@torch.no_grad()
def _encode_tokens(
    sae: nn.Module, model: Any, tokens_BS: Tensor, hook_name: str, hook_head_index: int | None
) -> Tensor:
    """SAE latents [B, S, F] of the model's activations at ``hook_name``."""
    device = getattr(getattr(model, "cfg", None), "device", None) or tokens_BS.device
    _, cache = model.run_with_cache(
        tokens_BS.to(device),
        names_filter=[hook_name],
        stop_at_layer=extract_stop_at_layer_from_tlens_hook_name(hook_name),
    )
    if hook_name not in cache:
        raise ValueError(
            f"running the model cached no activations at {hook_name!r} (is an SAE already "
            f"attached there? detach it first)"
        )
    acts = cache[hook_name]
    if hook_head_index is not None:
        acts = acts[:, :, hook_head_index]
    B, S = acts.shape[:2]
    sae_device, sae_dtype = _sae_device_dtype(sae)
    if getattr(sae, "hook_z_reshaping_mode", False):
        x = acts.reshape(B * S, *acts.shape[2:])
    else:
        x = acts.reshape(B * S, -1)
    z = sae.encode(x.to(sae_device, sae_dtype))  # type: ignore[operator]
    return z.reshape(B, S, -1).float().cpu()


@dataclass(slots=True)
class _Candidate:
    """A kept example before its tokens are decoded."""

    score: float
    seq_index: int
    position: int
    start: int
    ids: list[int]
    acts_i: list[float]
    acts_j: list[float]

    def key(self) -> tuple[float, int, int]:
        return (-self.score, self.seq_index, self.position)


class _ScanResult:
    def __init__(self, n_pairs: int, n_latents: int) -> None:
        self.candidates: list[list[_Candidate]] = [[] for _ in range(n_pairs)]
        self.n_cofire_P = torch.zeros(n_pairs, dtype=torch.long)
        self.n_fire_C = torch.zeros(n_latents, dtype=torch.long)
        self.n_sequences = 0
        self.n_tokens = 0


@torch.no_grad()
def _scan_cofiring(
    sae: nn.Module,
    model: Any,
    tokens: Tensor | Iterable[Tensor],
    *,
    cols_C: Tensor,
    a_P: Tensor,
    b_P: Tensor,
    hook_name: str,
    hook_head_index: int | None,
    n_examples: int,
    tokens_before: int,
    tokens_after: int,
    skip_ids: Tensor,
    pad_id: int | None,
    batch_size: int,
) -> _ScanResult:
    """Run the model and SAE over ``tokens`` and keep, per pair ``(cols_C[a_P[p]],
    cols_C[b_P[p]])``, the ``n_examples`` co-firing positions with the largest
    product of activations. Windows stop before trailing ``pad_id`` tokens."""
    result = _ScanResult(a_P.shape[0], cols_C.shape[0])
    for tokens_BS in _token_batches(tokens, batch_size):
        tokens_BS = tokens_BS.long().cpu()
        B, S = tokens_BS.shape
        z_BSC = _encode_tokens(sae, model, tokens_BS, hook_name, hook_head_index)[..., cols_C]
        keep_BS = ~torch.isin(tokens_BS, skip_ids)
        fired_BSC = (z_BSC != 0) & keep_BS[..., None]
        result.n_fire_C += fired_BSC.sum((0, 1))
        both_BSP = fired_BSC[..., a_P] & fired_BSC[..., b_P]
        result.n_cofire_P += both_BSP.sum((0, 1))
        score_NP = torch.where(
            both_BSP, z_BSC[..., a_P] * z_BSC[..., b_P], torch.tensor(-math.inf)
        ).reshape(B * S, -1)
        k = min(n_examples, B * S)
        vals_KP, flat_KP = score_NP.topk(k, dim=0)
        for p in range(a_P.shape[0]):
            found = result.candidates[p]
            for val, flat in zip(vals_KP[:, p].tolist(), flat_KP[:, p].tolist(), strict=True):
                if val == -math.inf:
                    break
                b, s = divmod(int(flat), S)
                start, stop = max(0, s - tokens_before), min(S, s + tokens_after + 1)
                while pad_id is not None and stop > s + 1 and int(tokens_BS[b, stop - 1]) == pad_id:
                    stop -= 1
                found.append(
                    _Candidate(
                        score=float(val),
                        seq_index=result.n_sequences + b,
                        position=s,
                        start=start,
                        ids=tokens_BS[b, start:stop].tolist(),
                        acts_i=z_BSC[b, start:stop, a_P[p]].tolist(),
                        acts_j=z_BSC[b, start:stop, b_P[p]].tolist(),
                    )
                )
            found.sort(key=_Candidate.key)
            del found[n_examples:]
        result.n_sequences += B
        result.n_tokens += int(keep_BS.sum())
    return result


def _unique_in_order(latents: int | Iterable[int], d_sae: int) -> list[int]:
    items = [latents] if isinstance(latents, int) else [int(x) for x in latents]
    out: list[int] = []
    for latent in items:
        if not 0 <= latent < d_sae:
            raise IndexError(f"latent {latent} is out of range: allowed 0..{d_sae - 1}")
        if latent not in out:
            out.append(latent)
    if not out:
        raise ValueError("latents is empty: choose at least one latent to show")
    return out


@torch.no_grad()
def interaction_view_data(
    sae: nn.Module,
    model: Any,
    tokens: Tensor | Iterable[Tensor] | None,
    latents: int | Iterable[int],
    *,
    n_partners: int = 10,
    n_logits: int = 10,
    n_examples: int = 5,
    tokens_before: int = 12,
    tokens_after: int = 4,
    partner_candidates: Tensor | Iterable[int] | None = None,
    hook_name: str | None = None,
    hook_head_index: int | None = None,
    skip_special_tokens: bool = True,
    batch_size: int = 8,
    title: str | None = None,
) -> InteractionView:
    """Partners, logit tables and co-firing examples of chosen latents.

    Args:
        sae: a PolySAE of order >= 2.
        model: a TransformerLens ``HookedTransformer`` (for ``run_with_cache``,
            ``W_U`` and its tokenizer).
        tokens: token ids to scan for examples: a [n_seq, ctx] tensor (run in
            batches of ``batch_size`` sequences) or an iterable of [batch, ctx]
            tensors; ``None`` scans nothing (no examples, zero counts).
        latents: the latent(s) to show, in page order (duplicates dropped).
        n_partners: partners per latent (:func:`~polysae_lens.analysis.top_partners`).
        n_logits: rows of each top and bottom logit table.
        n_examples: co-firing examples kept per pair.
        tokens_before: context tokens shown before a co-firing token.
        tokens_after: context tokens shown after it.
        partner_candidates: restrict partners to these latents (e.g. the live ones).
        hook_name: hook point of the SAE (default ``sae.cfg.metadata.hook_name``).
        hook_head_index: head of a per-head hook (default from the metadata).
        skip_special_tokens: never mark BOS/EOS/PAD/SEP positions as co-firing
            (they still show as context); their activations are often outliers.
        batch_size: sequences per forward pass when ``tokens`` is a tensor.
        title: page title (the model and hook are shown below it in any case).

    Raises:
        TypeError: ``sae`` is not a PolySAE.
        ValueError: the SAE has ``poly_order=1``, no hook name is known, a count
            is out of range, or ``tokens`` has the wrong shape.
        IndexError: a latent is out of range.
    """
    for name, value, low in (
        ("n_partners", n_partners, 1),
        ("n_logits", n_logits, 1),
        ("n_examples", n_examples, 0),
        ("tokens_before", tokens_before, 0),
        ("tokens_after", tokens_after, 0),
        ("batch_size", batch_size, 1),
    ):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    weights = poly_weights(sae)  # TypeError for a linear SAE
    d_sae = int(weights.U_FR.shape[0])
    chosen = _unique_in_order(latents, d_sae)
    metadata = getattr(getattr(sae, "cfg", None), "metadata", None)
    if hook_name is None and metadata is not None:
        hook_name = metadata.hook_name
    if hook_head_index is None and metadata is not None:
        hook_head_index = metadata.hook_head_index
    model_name = getattr(metadata, "model_name", None) or getattr(
        getattr(model, "cfg", None), "model_name", None
    )
    if partner_candidates is not None and not isinstance(partner_candidates, Tensor):
        partner_candidates = torch.as_tensor(list(partner_candidates), dtype=torch.long)

    # Partners and strengths.
    partners: list[list[tuple[int, float]]] = []
    for latent in chosen:
        found = top_partners(weights, latent, n_partners, latents=partner_candidates)
        partners.append(
            list(zip(found.pairs_P2[:, 1].tolist(), found.strength_P.tolist(), strict=True))
        )
    pair_list = [(i, j) for i, ps in zip(chosen, partners, strict=True) for j, _ in ps]
    i_P = torch.tensor([i for i, _ in pair_list], dtype=torch.long)
    j_P = torch.tensor([j for _, j in pair_list], dtype=torch.long)
    decode = _token_decoder(model)

    # Direct-path logits.
    W_U = getattr(model, "W_U", None)
    d_in = int(weights.C1_RD.shape[1])
    logit_rows: list[tuple[list[TokenLogit], list[TokenLogit]] | None] = [None] * len(pair_list)
    if W_U is None:
        logits_note = "No logit tables: the model has no unembedding W_U."
    elif W_U.shape[0] != d_in:
        logits_note = (
            f"No logit tables: the SAE's d_in ({d_in}) is not the model's d_model "
            f"({W_U.shape[0]}), so the interaction direction has no direct path to the logits."
        )
    else:
        logits_note = (
            "Logits are the direct path v_ij @ W_U per unit of z_i z_j (the final LayerNorm "
            "and later layers are skipped), like the logit tables of SAE dashboards."
        )
        if pair_list:
            v_PD = interaction_direction(weights, i_P, j_P)
            tv, ti, bv, bi = direct_logits(v_PD, W_U.detach(), n_logits)
            for p in range(len(pair_list)):
                rows = []
                for vals, ids in ((tv[p], ti[p]), (bv[p], bi[p])):
                    id_list = ids.tolist()
                    rows.append(
                        [
                            TokenLogit(token=t, token_id=k, logit=float(v))
                            for t, k, v in zip(decode(id_list), id_list, vals.tolist(), strict=True)
                        ]
                    )
                logit_rows[p] = (rows[0], rows[1])
    if "No logit" in logits_note:
        logger.warning("%s", logits_note)

    # Co-firing examples.
    cols_C, inverse = torch.unique(torch.cat((torch.tensor(chosen), i_P, j_P)), return_inverse=True)
    a_P = inverse[len(chosen) : len(chosen) + len(pair_list)]
    b_P = inverse[len(chosen) + len(pair_list) :]
    scan = _ScanResult(len(pair_list), cols_C.shape[0])
    if tokens is not None:
        if hook_name is None:
            raise ValueError(
                "the SAE's cfg.metadata has no hook_name: pass hook_name= (e.g. "
                "'blocks.8.hook_resid_post') to scan tokens"
            )
        hook_dict = getattr(model, "hook_dict", None)
        if hook_dict is not None and hook_name not in hook_dict:
            raise ValueError(
                f"hook {hook_name!r} is not a hook point of this model; e.g. "
                f"{list(hook_dict)[:3]} (see model.hook_dict)"
            )
        tokenizer = getattr(model, "tokenizer", None)
        special = (
            get_special_token_ids(tokenizer)
            if skip_special_tokens and tokenizer is not None
            else []
        )
        scan = _scan_cofiring(
            sae,
            model,
            tokens,
            cols_C=cols_C,
            a_P=a_P,
            b_P=b_P,
            hook_name=hook_name,
            hook_head_index=hook_head_index,
            n_examples=n_examples,
            tokens_before=tokens_before,
            tokens_after=tokens_after,
            skip_ids=torch.tensor(sorted(special), dtype=torch.long),
            pad_id=getattr(tokenizer, "pad_token_id", None),
            batch_size=batch_size,
        )
    n_fire = dict(zip(cols_C.tolist(), scan.n_fire_C.tolist(), strict=True))

    # Assemble.
    latent_views: list[LatentView] = []
    p = 0
    for latent, ps in zip(chosen, partners, strict=True):
        partner_views = []
        for partner, strength in ps:
            pair_rows = logit_rows[p]
            examples = [
                PairExample(
                    seq_index=c.seq_index,
                    position=c.position,
                    score=c.score,
                    window_start=c.start,
                    tokens=decode(c.ids),
                    token_ids=c.ids,
                    acts_latent=c.acts_i,
                    acts_partner=c.acts_j,
                )
                for c in scan.candidates[p]
            ]
            partner_views.append(
                PartnerView(
                    partner=partner,
                    strength=strength,
                    n_cofire=int(scan.n_cofire_P[p]),
                    top_logits=None if pair_rows is None else pair_rows[0],
                    bottom_logits=None if pair_rows is None else pair_rows[1],
                    examples=examples,
                )
            )
            p += 1
        latent_views.append(
            LatentView(latent=latent, n_fire=n_fire[latent], partners=partner_views)
        )
    if title is None:
        title = "PolySAE interaction view"
    return InteractionView(
        title=title,
        hook_name=hook_name,
        model_name=None if model_name is None else str(model_name),
        d_sae=d_sae,
        n_sequences=scan.n_sequences,
        n_tokens=scan.n_tokens,
        logits_note=logits_note,
        latents=latent_views,
    )


# ---------------------------------------------------------------------------
# Render step
# ---------------------------------------------------------------------------


@functools.cache
def _asset(name: str) -> str:
    """A file of the page template (``assets/interaction_view.{css,js,html}``)."""
    return resources.files("polysae_lens").joinpath("assets", name).read_text(encoding="utf-8")


def _round_floats(value: Any, digits: int) -> Any:
    """``value`` with every float rounded to ``digits`` significant digits
    (non-finite floats become ``None``, which JSON can carry)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _round_floats(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_round_floats(v, digits) for v in value]
    return value


def _json_for_script(data: Any) -> str:
    """JSON that is safe inside a ``<script>`` element: ``<``, ``>`` and ``&``
    are written as ``\\u`` escapes, so no text can close the element."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _csp_hash(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


def render_interaction_view(view: InteractionView, digits: int = 4) -> str:
    """The interaction page for ``view``: one self-contained HTML document (pure).

    Text from the data (tokens, title, names) reaches the page only through
    ``html.escape`` or as JSON read by the script, which inserts it with
    ``textContent``; it can never become markup. Floats are stored with
    ``digits`` significant digits.
    """
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    meta_parts = [
        f"model {view.model_name}" if view.model_name else None,
        f"hook {view.hook_name}" if view.hook_name else None,
        f"d_sae {view.d_sae}",
        f"{view.n_tokens} tokens scanned in {view.n_sequences} sequences",
        f"{len(view.latents)} latents shown",
    ]
    css, js = _asset("interaction_view.css"), _asset("interaction_view.js")
    csp = (
        "default-src 'none'; img-src data:; "
        f"style-src {_csp_hash(css)}; script-src {_csp_hash(js)}; "
        "base-uri 'none'; form-action 'none'"
    )
    fills = {
        "__CSP__": html.escape(csp),
        "__TITLE__": html.escape(view.title),
        "__META__": html.escape(" · ".join(p for p in meta_parts if p)),
        "__LOGITS_NOTE__": html.escape(view.logits_note),
        "__CSS__": css,
        "__JS__": js,
        "__DATA__": _json_for_script(_round_floats(view.to_dict(), digits)),
    }
    page = _asset("interaction_view.html")
    for marker in ("__CSP__", "__TITLE__", "__META__", "__LOGITS_NOTE__", "__CSS__", "__JS__"):
        page = page.replace(marker, fills[marker])
    # Data last: its text is never searched for markers.
    head, tail = page.split("__DATA__")
    return head + fills["__DATA__"] + tail


def write_interaction_view(
    sae: nn.Module,
    model: Any,
    tokens: Tensor | Iterable[Tensor] | None,
    latents: int | Iterable[int],
    path: str | Path,
    *,
    n_partners: int = 10,
    n_logits: int = 10,
    n_examples: int = 5,
    **kwargs: Any,
) -> InteractionView:
    """Compute the interaction view of ``latents`` and write it to ``path`` as HTML.

    Arguments as :func:`interaction_view_data` (further keyword arguments go
    there too). Returns the view, e.g. to save it with
    :meth:`InteractionView.to_json`.
    """
    view = interaction_view_data(
        sae,
        model,
        tokens,
        latents,
        n_partners=n_partners,
        n_logits=n_logits,
        n_examples=n_examples,
        **kwargs,
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_interaction_view(view), encoding="utf-8")
    logger.info("wrote the interaction view of %d latents to %s", len(view.latents), out)
    return view
