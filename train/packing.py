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
  :func:`~densekit.train.vit.segment_attention_mask`: a token sees only its own image, padding only padding),
  so a packed image equals the image run alone;
  :func:`segment_sum` / :func:`segment_mean` / :func:`segment_softmax` (per-image pooling) and :func:`unpack`
  (per-image token lists, padded).

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
from densekit.train.vit import ViTAdapter, segment_attention_mask

# ----------------------------------------------------------------------------------------------------
# Transform side (numpy)
# ----------------------------------------------------------------------------------------------------


def patchify(image: np.ndarray, patch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut a (C, H, W) float32 view (H, W multiples of ``patch``) into raster-ordered patches.

    Returns:
        patches (h*w, C*p*p) float32 flattened in (c, dy, dx) order, the order of a patch-embedding conv's
        weight (D, C, p, p); coords (h*w, 2) int64 (row, col); grid (2,) int64 (h, w).
    """
    c, hh, ww = image.shape
    if hh % patch or ww % patch or hh < patch or ww < patch:
        raise DensekitError(f"a {ww}x{hh} view does not split into {patch}x{patch} patches")
    h, w = hh // patch, ww // patch
    x = image.reshape(c, h, patch, w, patch).transpose(1, 3, 0, 2, 4).reshape(h * w, c * patch * patch)
    rows, cols = np.divmod(np.arange(h * w, dtype=np.int64), w)
    return np.ascontiguousarray(x, np.float32), np.stack([rows, cols], 1), np.array([h, w], np.int64)


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


def first_fit(lengths: Sequence[int], seq_len: int, num_seqs: int = 0) -> list[tuple[int, int]]:
    """Greedy first-fit-decreasing packing: the (sequence, offset) of each item.

    Items are placed longest first (ties: lower index first), each into the first sequence with room, so the
    result is a pure function of ``lengths``. Within a sequence, items sit in placement order.

    Args:
        lengths: tokens per item (prefix slots included).
        seq_len: L, the length of every sequence.
        num_seqs: S, a fixed number of sequences (0: as many as needed).
    Raises:
        DensekitError: an item longer than ``seq_len``; more than ``num_seqs`` sequences needed.
    """
    if seq_len < 1:
        raise DensekitError(f"the packed sequence length must be >= 1, got {seq_len}")
    too_long = [i for i, n in enumerate(lengths) if n > seq_len]
    if too_long:
        i = too_long[0]
        raise DensekitError(
            f"image {i} has {lengths[i]} tokens, more than the packed sequence length {seq_len} "
            f"({len(too_long)} such image(s)); raise the sequence length or lower the resolution"
        )
    fill: list[int] = []
    where: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        s = next((j for j, used in enumerate(fill) if used + lengths[i] <= seq_len), len(fill))
        if s == len(fill):
            fill.append(0)
        where[i] = (s, fill[s])
        fill[s] += lengths[i]
    if num_seqs and len(fill) > num_seqs:
        raise DensekitError(f"{len(lengths)} images ({sum(lengths)} tokens) need {len(fill)} packed sequences of "
                            f"{seq_len}, more than the {num_seqs} allowed")
    return where


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
        where = first_fit([n + self.prefix for n in counts], self.seq_len, self.num_seqs)
        n_seq = max((s for s, _ in where), default=-1) + 1
        out = {name: np.zeros((n_seq, self.seq_len, *samples[0][name].shape[1:]), samples[0][name].dtype)
               for name in names}
        seg = np.full((n_seq, self.seq_len), -1, np.int64)
        tok = np.full((n_seq, self.seq_len), -1, np.int64)
        is_prefix = np.zeros((n_seq, self.seq_len), bool)
        for i, ((s, o), n) in enumerate(zip(where, counts)):
            seg[s, o : o + self.prefix + n] = i
            is_prefix[s, o : o + self.prefix] = True
            a = o + self.prefix
            tok[s, a : a + n] = np.arange(n)
            for name in names:
                out[name][s, a : a + n] = samples[i][name]
        out.update({f"{k}seg": seg, f"{k}tok": tok, f"{k}is_prefix": is_prefix,
                    f"{k}length": np.asarray(counts, np.int64)})
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


def packed_embed(vit: ViTAdapter, patches: torch.Tensor, coords: torch.Tensor, seg: torch.Tensor,
                 is_prefix: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token content and position embeddings of a packed batch, kept apart (DropPos swaps positions).

    The patch embedding is its conv written as a linear map of the flattened patch; the position embeddings are
    the ViT's own, resampled to each image's grid as its grid forward does (:meth:`ViTAdapter.pos_for`), so an
    image packed with others gives the tokens it gives alone.

    Args:
        vit: the ViT's parts.
        patches: (S, L, 3 p p) flattened patches; coords (S, L, 2) (row, col); seg, is_prefix (S, L);
            grid (B, 2) each image's full patch grid (h, w), which picks its position embeddings.
    Returns:
        content (S, L, D): patch embeddings at patch slots, prefix tokens (with their position, if any) at
        prefix slots, 0 at padding; pos (S, L, D): patch position embeddings at patch slots, 0 elsewhere.
    """
    proj = vit.model.patch_embed.proj
    w = proj.weight.reshape(proj.weight.shape[0], -1)
    content = vit.model.patch_embed.norm(torch.nn.functional.linear(patches, w, proj.bias))
    is_patch = (seg >= 0) & ~is_prefix
    content = content * is_patch.unsqueeze(-1).to(content.dtype)
    pref = vit.prefix_tokens(1)
    if pref is not None:
        pref = pref[0].to(content.dtype)
        # every image has the same P prefix slots in front of its tokens: the k-th is (prefix slots so far) mod P
        k = (torch.cumsum(is_prefix.long(), dim=1) - 1).clamp_min(0) % pref.shape[0]
        content = torch.where(is_prefix.unsqueeze(-1), pref[k], content)
    pos = content.new_zeros(content.shape)
    img = seg.clamp_min(0)
    for h, w_ in torch.unique(grid, dim=0).tolist():
        table = vit.pos_for(int(h), int(w_))
        if table is None:  # pos_embed='none'
            break
        sel = is_patch & (grid[img, 0] == h) & (grid[img, 1] == w_)
        pos[sel] = table[0].to(content.dtype)[coords[..., 0][sel] * w_ + coords[..., 1][sel]]
    return content, pos


def packed_blocks(vit: ViTAdapter, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """Pre-block ops, the blocks under the block-diagonal mask, final norm: (S, L, D) -> (S, L, D)."""
    return vit.norm(vit.run_blocks(vit.pre_blocks(x), segment_attention_mask(seg)))


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

