"""Sequence layout: how a global sequence is cut across the ranks of a sequence-parallel group.

`shard_sequence` gives a rank its chunk, `unshard_sequence` puts all chunks back in global
order, and `sequence_positions` tells where each local token sits in the global sequence
(what RoPE and position embeddings must see, since zigzag reorders tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_seqpar.ops._pieces import LAYOUTS, check_layout, local_positions, rank_pieces, required_multiple

__all__ = ["LAYOUTS", "shard_sequence", "unshard_sequence", "sequence_positions", "check_splittable"]


def check_splittable(seq_len: int, world_size: int, layout: str) -> None:
    """Raise a ValueError that names the needed multiple when `seq_len` can't be cut evenly."""
    multiple = required_multiple(world_size, layout)
    if seq_len % multiple != 0:
        padded = -(-seq_len // multiple) * multiple
        raise ValueError(
            f"sequence length {seq_len} can't be split by the {layout!r} layout over "
            f"{world_size} ranks: it must be a multiple of {multiple}; pad it to {padded} "
            f"(padded keys masked, padded labels ignored) or choose another length"
        )


def _piece_len(seq_len: int, world_size: int, layout: str) -> int:
    check_splittable(seq_len, world_size, layout)
    return seq_len // required_multiple(world_size, layout)


def shard_sequence(x: torch.Tensor, dim: int, rank: int, world_size: int, layout: str) -> torch.Tensor:
    """The chunk of `x` along `dim` that `rank` holds (a view for contiguous, a copy for zigzag)."""
    piece = _piece_len(x.size(dim), world_size, layout)
    parts = [x.narrow(dim, p * piece, piece) for p in rank_pieces(rank, world_size, layout)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def unshard_sequence(chunks: Sequence[torch.Tensor], dim: int, layout: str) -> torch.Tensor:
    """Inverse of `shard_sequence`: `chunks[r]` is rank r's chunk; returns the global tensor."""
    check_layout(layout)
    world_size = len(chunks)
    if world_size == 0:
        raise ValueError("unshard_sequence needs the chunks of at least one rank")
    sizes = {c.size(dim) for c in chunks}
    if len(sizes) != 1:
        raise ValueError(f"all chunks must have the same length along dim {dim}, got {sorted(sizes)}")
    local_len = sizes.pop()
    n_pieces = required_multiple(world_size, layout)
    piece = local_len // (n_pieces // world_size)
    if piece * (n_pieces // world_size) != local_len:
        raise ValueError(f"a {layout!r} chunk must hold an even number of tokens, got {local_len}")
    ordered: list[torch.Tensor | None] = [None] * n_pieces
    for rank, chunk in enumerate(chunks):
        for i, p in enumerate(rank_pieces(rank, world_size, layout)):
            ordered[p] = chunk.narrow(dim, i * piece, piece)
    return torch.cat(ordered, dim=dim)  # type: ignore[arg-type]


def sequence_positions(
    seq_len: int, rank: int, world_size: int, layout: str, device: torch.device | str | None = None
) -> torch.Tensor:
    """Global positions (int64, `[seq_len // world_size]`) of the tokens that `rank` holds."""
    check_splittable(seq_len, world_size, layout)
    return local_positions(rank, world_size, seq_len // world_size, layout, device)
