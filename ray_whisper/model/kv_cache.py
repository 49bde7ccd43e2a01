"""The decoder's key/value cache: tensors allocated once for the longest sequence, written in place, that rows
leave as they finish (greedy: the last row moves into the hole) or are reordered (beams).

Per decoder layer it holds the self-attention keys/values of the tokens so far and the cross-attention
keys/values of the encoder output, computed once per chunk. network.Whisper.new_cache makes one.
"""

from __future__ import annotations

import torch


class DecoderCache:
    """Per decoder layer: self-attention keys/values written in place into tensors sized for the longest
    sequence, and the cross-attention keys/values of the encoder output, computed once.

    The first `rows` batch rows of the self-attention tensors are in use. With beam search each chunk has
    `group` rows (its beams) that share one cross-attention row: the first rows // group of those. Rows that
    finish leave with `drop` (greedy) or `reorder` (beams)."""

    def __init__(self, self_kv: list[tuple[torch.Tensor, torch.Tensor]], cross_kv: list[tuple[torch.Tensor, torch.Tensor]],
                 group: int = 1, offsets: torch.Tensor | None = None):
        self._self_kv = self_kv
        self._cross_kv = cross_kv
        self.group = group
        self.rows = self_kv[0][0].shape[0] if self_kv else 0
        self.length = 0
        # per row, how many padding positions precede its first token (None: no row is padded)
        self.offsets = offsets if offsets is not None and bool(offsets.any()) else None

    @property
    def capacity(self) -> int:
        return self._self_kv[0][0].shape[2]

    @property
    def self_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(k[: self.rows], v[: self.rows]) for k, v in self._self_kv]

    @property
    def cross_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        n = self.rows // self.group
        return [(k[:n], v[:n]) for k, v in self._cross_kv]

    def drop(self, going: torch.Tensor) -> torch.Tensor:
        """Remove the rows where `going` (bool, one per row in use) is False (greedy: one row per chunk).
        The kept rows at the end move into the places of those that leave, so a row leaving costs one row's
        copy, not a copy of the whole cache (for tiny on CPU, ~18 MB per row of cross-attention keys and
        values). Returns, for each row in its new place, the index it had before; the caller reorders its own
        per-row state with it."""
        if self.group != 1:
            raise ValueError("drop is for caches of one row per chunk; beams leave with reorder")
        keep = going.nonzero()[:, 0]
        n = keep.numel()
        order = torch.arange(n, device=keep.device)
        holes = (~going[:n]).nonzero()[:, 0]  # leaving rows among the first n
        movers = keep[keep >= n]  # kept rows beyond the first n: as many as there are holes
        if holes.numel():
            for k, v in self._self_kv:
                k[holes, :, : self.length] = k[movers, :, : self.length]
                v[holes, :, : self.length] = v[movers, :, : self.length]
            for k, v in self._cross_kv:
                k[holes] = k[movers]
                v[holes] = v[movers]
            order[holes] = movers
        self.rows = n
        if self.offsets is not None:
            self.offsets = self.offsets[order]
        return order

    def reorder(self, rows: torch.Tensor, chunks: torch.Tensor | None = None) -> None:
        """Beam search: the self-attention rows in use become old rows `rows`, in that order (a beam that
        continues two ways is copied), and, when chunks leave, the cross-attention rows become old rows
        `chunks` (len(rows) == group * len(chunks))."""
        n = rows.numel()
        for k, v in self._self_kv:
            k[:n, :, : self.length] = k[rows, :, : self.length]
            v[:n, :, : self.length] = v[rows, :, : self.length]
        if chunks is not None:
            if chunks.numel() * self.group != n:
                raise ValueError(f"{n} rows are not {self.group} beams for each of {chunks.numel()} chunks")
            for k, v in self._cross_kv:
                k[: chunks.numel()] = k[chunks]
                v[: chunks.numel()] = v[chunks]
        self.rows = n
        if self.offsets is not None:
            self.offsets = self.offsets[rows]
