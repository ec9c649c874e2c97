"""Tokens as text, coloured by next-token KL: the drift view's and the report's per-token HTML."""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE spells every byte as a printable character; this maps them back."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTES = _byte_decoder()


def readable_tokens(tokens: Sequence[str]) -> list[str]:
    """Token strings as text: byte-level BPE ('Ġ' space, 'Ċ' newline) and SentencePiece ('▁') undone."""
    byte_level = any(("Ġ" in t or "Ċ" in t) for t in tokens)
    out = []
    for t in tokens:
        if byte_level and all(c in _BYTES for c in t):
            t = bytes(_BYTES[c] for c in t).decode("utf-8", errors="replace")
        out.append(t.replace("▁", " "))
    return out


def token_kl_html(example: dict, *, vmax: float | None = None) -> str:
    """One example's tokens coloured by next-token KL(original ‖ emulator); hover shows the value.

    White is zero, full red is `vmax` (default: this example's largest KL). Text is
    HTML-escaped; a newline shows as ↵ and breaks the line.
    """
    kl = [float(v) for v in example["kl"]]
    top = vmax if vmax is not None else max(kl, default=0.0)
    spans = []
    for text, value in zip(readable_tokens(example["tokens"]), kl):
        alpha = 0.0 if top <= 0 else min(1.0, max(0.0, value / top))
        shown = html.escape(text).replace("\n", "↵<br>")
        spans.append(
            f"<span title='KL {value:.4f}' style='background:rgba(214,39,40,{alpha:.3f});"
            f"border-radius:2px'>{shown}</span>"
        )
    legend = (
        f"<div style='font-size:12px;color:#555;margin-top:4px'>colour: KL(original ‖ emulator) of the "
        f"prediction made at each token, white = 0, red = {top:.3g} nats; mean {np.mean(kl) if kl else 0:.3g} "
        f"over {len(kl)} tokens</div>"
    )
    return (
        f"<div style='font-family:monospace;white-space:pre-wrap;line-height:1.6;border:1px solid #ddd;"
        f"padding:6px'>{''.join(spans)}</div>{legend}"
    )
