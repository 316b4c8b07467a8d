"""NaViT-style "patch n' pack" for ViT objectives: images at their own size, several per fixed-length sequence.

Dehghani et al., "Patch n' Pack: NaViT, a Vision Transformer for any Aspect Ratio and Resolution" (2023). There
is no official code; this is densekit's design after the paper's mechanisms (``../shared/notes`` section 2.5):

* **Transform side** (numpy, DataLoader workers, randomness only from the sample's generator):
  :func:`native_grid` picks an aspect-preserving patch grid, :func:`patchify` cuts a (3, H, W) view into
  ``patches (n, 3 p p)`` with ``coords (n, 2)`` (row, col), :func:`drop_tokens` keeps a random subset (coords
  follow their tokens).
* **Collate** (:class:`PackCollate`, picklable, a pure function of the step's samples): a greedy first-fit
  packer (:func:`first_fit`) puts each image's prefix slots (CLS, registers) and tokens into one of S
  sequences of length L; it returns the packed token arrays with ``seg`` (image index in the batch, -1 =
  padding), ``tok`` (index in the image's token list, -1 for prefix slots and padding) and ``is_prefix``, the
  per-image arrays stacked ``(B, ...)`` and ``num_images`` (what the trainer counts).
* **Model side** (torch): :func:`packed_embed` / :func:`packed_forward` on a timm ViT through
  :class:`~densekit.train.vit.ViTAdapter` (patch embedding as a linear map of the flattened patch, the ViT's own
  position embeddings resampled per image grid exactly as its grid forward does, blocks under
  :func:`~densekit.serve.packing.segment_attention_mask`: a token sees only its own image, padding only padding),
  so a packed image equals the image run alone;
  :func:`segment_sum` / :func:`segment_mean` / :func:`segment_softmax` (per-image pooling) and :func:`unpack`
  (per-image token lists, padded).

:func:`patchify`, :func:`first_fit`, :func:`packed_embed` and :func:`packed_blocks` are
:mod:`densekit.serve.packing`'s (serving and export pack too), re-exported here.

Measured here (ViT-Tiny/16, 12 blocks, 8 images of 20-196 patches = 762 tokens with CLS, 2 shared CPU threads,
medians of 8 interleaved rounds on a loaded machine): packed vs alone max |diff| 5.6e-6; with L = 256 (4 sequences)
the forward is 1.7x and forward+backward 1.8x faster than one image at a time; one 762-token sequence is not
faster (0.3x-1.3x across runs): its L^2 attention outweighs the batching gain at this width, so keep L near a few
images' worth of tokens.

Several packings of one sample can travel in one batch (DropPos packs the visible tokens and, for its attentive
weights, the full image): each is a :class:`Stream` whose keys carry its prefix (``""``, ``"full_"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from densekit.serve.errors import DensekitError

# the layout and the packed ViT forward serve shares (inference and export pack too) live in serve
from densekit.serve.packing import first_fit, pack_layout, packed_blocks, packed_embed, patchify
from densekit.train.vit import ViTAdapter

# ----------------------------------------------------------------------------------------------------
# Transform side (numpy)
# ----------------------------------------------------------------------------------------------------


def keep_count(n: int, rate: float, at_least: int = 1) -> int:
    """Tokens kept of ``n`` when dropping a fraction ``rate``: ``floor(n (1 - rate))`` (MAE's ``len_keep``),
    at least ``at_least``."""
    return max(min(at_least, n), int(n * (1.0 - float(rate))))


def drop_tokens(rng: np.random.Generator, n: int, rate: float, at_least: int = 1) -> np.ndarray:
    """Indices (sorted, int64) of the tokens kept when dropping a random fraction ``rate`` of ``n`` (one draw:
    a permutation)."""
    if not 0.0 <= rate < 1.0:
        raise DensekitError(f"a token drop rate must be in [0, 1), got {rate}")
    return np.sort(rng.permutation(n)[: keep_count(n, rate, at_least)]).astype(np.int64)


def native_grid(rng: np.random.Generator, aspect: float, max_side: int, min_side: int = 1) -> tuple[int, int]:
    """A patch grid (h, w) of aspect ``aspect`` = w / h whose longer side is uniform in [min_side, max_side]
    (NaViT's resolution sampling with the aspect kept; one draw)."""
    if not 1 <= min_side <= max_side:
        raise DensekitError(f"need 1 <= min_side <= max_side, got {min_side} and {max_side}")
    side = int(rng.integers(min_side, max_side + 1))
    if aspect >= 1.0:
        return max(1, min(side, int(round(side / aspect)))), side
    return side, max(1, min(side, int(round(side * aspect))))


# ----------------------------------------------------------------------------------------------------
# Collate: greedy first-fit packing
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stream:
    """One packing of the samples: keys ``f"{key}patches"``, ``f"{key}coords"`` and ``tokens`` (other per-token
    arrays, first axis n) are packed into (S, L, ...) with ``f"{key}seg"``, ``f"{key}tok"``,
    ``f"{key}is_prefix"``; ``prefix`` slots per image are reserved in front of its tokens."""

    key: str = ""
    seq_len: int = 256
    num_seqs: int = 0
    prefix: int = 1
    tokens: tuple[str, ...] = ()

    def pack(self, samples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        k = self.key
        names = (f"{k}patches", f"{k}coords", *(f"{k}{t}" for t in self.tokens))
        counts = [len(s[f"{k}patches"]) for s in samples]
        where, layout = pack_layout(counts, self.seq_len, self.prefix, self.num_seqs)
        n_seq = layout["seg"].shape[0]
        out = {name: np.zeros((n_seq, self.seq_len, *samples[0][name].shape[1:]), samples[0][name].dtype)
               for name in names}
        for i, ((s, o), n) in enumerate(zip(where, counts)):
            a = o + self.prefix
            for name in names:
                out[name][s, a : a + n] = samples[i][name]
        out.update({f"{k}{name}": v for name, v in layout.items()})
        out[f"{k}length"] = np.asarray(counts, np.int64)
        return out


@dataclass(frozen=True)
class PackCollate:
    """The collate of a packing objective (picklable: plain numbers only).

    Every key of a sample that no stream packs is stacked into (B, ...), as the default collate does (so those
    arrays must have one shape across samples). Returns torch tensors plus ``num_images`` (0-d int64).
    """

    streams: tuple[Stream, ...] = (Stream(),)

    def __call__(self, samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        if not samples:
            raise DensekitError("cannot pack an empty batch")
        out: dict[str, np.ndarray] = {}
        packed: set[str] = set()
        for st in self.streams:
            out.update(st.pack(samples))
            packed.update({f"{st.key}patches", f"{st.key}coords", *(f"{st.key}{t}" for t in st.tokens)})
        for name in samples[0]:
            if name not in packed:
                shapes = {np.shape(s[name]) for s in samples}
                if len(shapes) > 1:
                    raise DensekitError(f"per-image array {name!r} differs in shape across images: {sorted(shapes)}")
                out[name] = np.stack([s[name] for s in samples])
        batch = {name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in out.items()}
        batch["num_images"] = torch.tensor(len(samples), dtype=torch.int64)
        return batch


def padding_fraction(seg: torch.Tensor) -> float:
    """Share of the packed slots that are padding."""
    return float((seg < 0).float().mean()) if seg.numel() else 0.0


# ----------------------------------------------------------------------------------------------------
# Model side (torch)
# ----------------------------------------------------------------------------------------------------


def segment_sum(x: torch.Tensor, seg: torch.Tensor, num_images: int, weight: torch.Tensor | None = None,
                select: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image sums of packed tokens: x (S, L, D) -> (B, D); padding never counts.

    Args:
        weight: optional (S, L) per-token weights.
        select: optional (S, L) bool; only these tokens count (e.g. ``~is_prefix``).
    """
    keep = seg >= 0 if select is None else (seg >= 0) & select
    vals = x[keep]
    if weight is not None:
        vals = vals * weight[keep].unsqueeze(-1).to(vals.dtype)
    out = torch.zeros(num_images, x.shape[-1], dtype=x.dtype, device=x.device)
    return out.index_add(0, seg[keep], vals)


def segment_mean(x: torch.Tensor, seg: torch.Tensor, num_images: int,
                 select: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image means (masked pooling) of packed tokens: (S, L, D) -> (B, D)."""
    keep = seg >= 0 if select is None else (seg >= 0) & select
    count = torch.zeros(num_images, dtype=x.dtype, device=x.device).index_add(
        0, seg[keep], torch.ones_like(seg[keep], dtype=x.dtype))
    return segment_sum(x, seg, num_images, select=select) / count.clamp_min(1).unsqueeze(-1)


def segment_softmax(scores: torch.Tensor, seg: torch.Tensor, num_images: int,
                    select: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax of (S, L) scores within each image's selected tokens; 0 elsewhere."""
    keep = seg >= 0 if select is None else (seg >= 0) & select
    ids, s = seg[keep], scores[keep]
    top = torch.full((num_images,), -torch.inf, dtype=s.dtype, device=s.device).scatter_reduce(
        0, ids, s, reduce="amax")
    e = torch.exp(s - top[ids])
    total = torch.zeros(num_images, dtype=s.dtype, device=s.device).index_add(0, ids, e)
    out = torch.zeros_like(scores)
    out[keep] = e / total[ids]
    return out


def unpack(x: torch.Tensor, seg: torch.Tensor, tok: torch.Tensor, num_images: int,
           max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image token lists: x (S, L, ...) -> (B, N, ...) in each image's token order, with valid (B, N) bool.

    Prefix slots and padding are left out; N = ``max_tokens`` or the longest image.
    """
    keep = tok >= 0
    n = int(tok.max()) + 1 if max_tokens is None and keep.any() else int(max_tokens or 0)
    out = x.new_zeros((num_images, n, *x.shape[2:]))
    valid = torch.zeros(num_images, n, dtype=torch.bool, device=x.device)
    out = out.index_put((seg[keep], tok[keep]), x[keep])
    valid[seg[keep], tok[keep]] = True
    return out, valid


# -- timm ViT ------------------------------------------------------------------------------------------


def packed_forward(vit: ViTAdapter, batch: dict[str, torch.Tensor], key: str = "") -> torch.Tensor:
    """A timm ViT on one packed stream of ``batch``: (S, L, D) final tokens (prefix slots included).

    The images' grids are ``batch[key + "grid"]``, or ``batch["grid"]`` when the stream has none of its own.
    """
    grid = batch.get(f"{key}grid", batch["grid"])
    content, pos = packed_embed(vit, batch[f"{key}patches"], batch[f"{key}coords"], batch[f"{key}seg"],
                                batch[f"{key}is_prefix"], grid)
    return packed_blocks(vit, content + pos, batch[f"{key}seg"])


def stream_for(vit: ViTAdapter, seq_len: int, num_seqs: int = 0, key: str = "",
               tokens: tuple[str, ...] = ()) -> Stream:
    """A :class:`Stream` with the ViT's number of prefix tokens."""
    return Stream(key=key, seq_len=int(seq_len), num_seqs=int(num_seqs), prefix=vit.num_prefix_tokens,
                  tokens=tuple(tokens))


__all__ = [
    "PackCollate", "Stream", "drop_tokens", "first_fit", "keep_count", "native_grid", "packed_blocks",
    "packed_embed", "packed_forward", "padding_fraction", "patchify", "segment_mean", "segment_softmax",
    "segment_sum", "stream_for", "unpack",
]

