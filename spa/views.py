"""The two-view batch layout of SPA, in one place.

SPA runs every sequence twice, as its original prompt and as its masked prompt, and both views of a
whole batch go through one forward. :func:`build_views` lays them out:

* rows are interleaved per sequence, ``[seq 0 original, seq 0 masked, seq 1 original, ...]``, or hold
  one view only (omega = 1 needs only the original view, omega = 0 only the masked one, see
  :func:`views_for`);
* every row is left-padded, with its own attention mask (1 = a real token this row may attend to) and
  its own position ids, which count that row's real tokens (padding and holes take no position);
* the masked view may have any length. Both views of a sequence then get the same number of columns:
  the shorter one has a *hole* (masked columns, like padding) right after the tokens the two views
  share, so the shared prefix sits in the same columns of both rows and the last column of every row
  is its last real token. Views of equal length get no hole, only left padding.

``shared`` is the number of leading columns where both rows of every sequence agree (ids, attention,
positions): the decoder runs them once, on the first view's rows, and copies their cache to the
second view's rows. It is the shared prefix "up to the first differing token", taken over the batch
(the sequence whose views differ earliest, counted in columns, bounds it), and at least the last
column is left out of it, since the forward over both views must yield each row's last logits.

Per-view keep masks serve ``masking="attention"``: the masked view keeps its ids but may not attend to
anchored positions. Those positions still count as real tokens for the position ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

VIEWS: tuple[str, ...] = ("original", "masked")


def views_for(omega: float) -> tuple[str, ...]:
    """The views that contribute to ``omega * f(original) + (1 - omega) * f(masked)``."""
    return tuple(view for view, needed in (("original", omega != 0.0), ("masked", omega != 1.0)) if needed)


def left_pad(rows: Sequence[Sequence], width: int, fill, device: torch.device | str | None = None) -> torch.Tensor:
    """``rows`` as one tensor, each row preceded by ``fill`` up to ``width`` columns."""
    return torch.tensor([[fill] * (width - len(row)) + list(row) for row in rows], device=device)


def count_positions(real: torch.Tensor) -> torch.Tensor:
    """Position ids that count each row's real tokens; padding and holes repeat the previous one (or 0)."""
    return (real.long().cumsum(-1) - 1).clamp(min=0)


@dataclass(frozen=True)
class ViewBatch:
    """One left-padded batch of interleaved view rows, ready for a model forward."""

    views: tuple[str, ...]  # the views of each sequence, in row order
    input_ids: torch.Tensor  # (sequences * len(views), width)
    attention_mask: torch.Tensor  # same shape, long: 1 where the row attends to the column
    position_ids: torch.Tensor  # same shape
    shared: int  # leading columns identical in both views of every sequence (0 with one view)

    def rows(self, view: str) -> slice:
        """The rows of one view."""
        return slice(self.views.index(view), None, len(self.views))


def _with_hole(ids: list[int], keep: list[bool], at: int, size: int, pad_id: int) -> tuple[list[int], list[bool], list[bool]]:
    """(ids, real, keep) of one view with ``size`` masked columns inserted before index ``at``."""
    return (
        ids[:at] + [pad_id] * size + ids[at:],
        [True] * at + [False] * size + [True] * (len(ids) - at),
        keep[:at] + [False] * size + keep[at:],
    )


def build_views(
    original: Sequence[Sequence[int]],
    masked: Sequence[Sequence[int]] | None = None,
    *,
    views: Sequence[str] = VIEWS,
    original_keep: Sequence[Sequence[bool]] | None = None,
    masked_keep: Sequence[Sequence[bool]] | None = None,
    pad_id: int = 0,
    device: torch.device | str | None = None,
) -> ViewBatch:
    """The batch of ``views`` for sequences whose views have the token ids ``original[i]`` / ``masked[i]``.

    ``masked`` may be omitted when ``views`` is ``("original",)``. ``*_keep`` are per-token attention
    keep-masks of a view (False: no row attends to that token; default all True). ``pad_id`` fills
    padding and holes: those columns are never attended, so any valid id does.
    """
    views = tuple(views)
    if not views or any(view not in VIEWS for view in views) or len(set(views)) != len(views):
        raise ValueError(f"views must be distinct entries of {VIEWS}, got {views}")
    given = {"original": (original, original_keep), "masked": (masked, masked_keep)}
    for view in views:
        ids, keep = given[view]
        if ids is None or len(ids) != len(original):
            raise ValueError(f"the {view} view needs one id list per sequence ({len(original)})")
        if any(len(i) == 0 for i in ids):
            raise ValueError(f"every {view} view needs at least one token")
        if keep is not None and [len(k) for k in keep] != [len(i) for i in ids]:
            raise ValueError(f"the {view} keep-masks must match its id lists in number and lengths")
    rows: list[tuple[list[int], list[bool], list[bool]]] = []  # (ids, real, keep) per row
    for i in range(len(original)):
        per_view = []
        for view in views:
            ids, keep = given[view]
            per_view.append((list(map(int, ids[i])), list(map(bool, keep[i])) if keep is not None else [True] * len(ids[i])))
        at, longest = 0, max(len(ids) for ids, _ in per_view)
        if len(per_view) == 2:
            (a, a_keep), (b, b_keep) = per_view
            # The hole goes where the views first differ, but before the shorter view's last token.
            last = min(len(a), len(b)) - 1
            at = next((j for j in range(last) if a[j] != b[j] or a_keep[j] != b_keep[j]), last)
        rows.extend(_with_hole(ids, keep, at, longest - len(ids), pad_id) for ids, keep in per_view)
    width = max(len(ids) for ids, _, _ in rows)
    input_ids = left_pad([ids for ids, _, _ in rows], width, pad_id, device)
    real = left_pad([r for _, r, _ in rows], width, False, device)
    attention = real & left_pad([k for _, _, k in rows], width, False, device)
    positions = count_positions(real)
    shared = 0
    if len(views) == 2:
        same = (input_ids[0::2] == input_ids[1::2]) & (attention[0::2] == attention[1::2]) & (positions[0::2] == positions[1::2])
        differs = (~same).any(dim=0).nonzero()
        shared = min(int(differs[0]) if differs.numel() else width, width - 1)
    return ViewBatch(views=views, input_ids=input_ids, attention_mask=attention.long(), position_ids=positions, shared=shared)
