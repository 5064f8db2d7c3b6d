"""Which training records are kept for the influences, and their content hashes.

The estimation pass keeps ``num_records`` records: the first ones seen (``selection="first"``)
or the bottom-k by a content hash (:func:`record_keys`), which is the same set however the
data is ordered, batched or split over processes. The state is a dict of plain tensors and
lists (see :class:`~mis_lightning.estimation.estimate.MomentAccumulator`): ``rec_grad``
(per-sample gradients ``[k, d]``) or ``rec_x``/``rec_y`` (the records), and ``rec_key``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

_P31 = 2_147_483_647  # 2^31 - 1: modulus of the record hash
_HASH_BLOCK = 4096
_SUM_BLOCK = 1 << 20  # bytes per exact sum in record_keys: 2^20 x 255 x 2^16 < 2^53 (float64), x 2^31 < 2^63
_HASH_WEIGHTS: dict[int, Tensor] = {}
_KEY_ROW_BYTES = 1 << 16  # record bytes widened to float64 at once in record_keys (512 KiB)


def _hash_weights(leaf: int, length: int) -> Tensor:
    """``[length]`` int64 weights in ``[1, 2^31 - 1)`` of the byte positions of one leaf: a
    function of ``(leaf, position)`` only (blocks of ``_HASH_BLOCK`` drawn from fixed seeds),
    so that a record's zero bytes add nothing wherever the row ends: the same sequence padded
    with zeros to another length (per-batch padding) keeps its key."""
    w = _HASH_WEIGHTS.get(leaf)
    if w is None or w.numel() < length:
        have = 0 if w is None else w.numel()
        blocks = [] if w is None else [w]
        for k in range(have // _HASH_BLOCK, -(-length // _HASH_BLOCK)):
            gen = torch.Generator().manual_seed(1_000_003 * leaf + k + 1)
            blocks.append(torch.randint(1, _P31, (_HASH_BLOCK,), generator=gen, dtype=torch.int64))
        w = _HASH_WEIGHTS[leaf] = torch.cat(blocks)
    return w[:length]


_INDEX_WEIGHTS: dict[tuple[int, tuple[int, ...]], Tensor] = {}


def _index_weights(leaf: int, shape: tuple[int, ...]) -> Tensor:
    """``[prod(shape)]`` int64 weights in ``[1, 2^31 - 1)`` of the byte positions of a leaf whose
    records have several dimensions (``shape``: the record's shape, then its bytes per value):
    ``prod_k T_k[j_k] mod (2^31 - 1)``, one random table ``T_k`` per dimension (fixed seeds), so
    that a byte's weight depends on its index in each dimension and not on the sizes of the
    others: a record padded with zeros at the end of *any* dimension keeps its key (per-batch
    padding of edge lists ``[2, E]``, adjacencies ``[N, N]``, images; formerly, with weights by flat
    position, the same 711 graphs batched by 16 and by 128 drew other samples, 1.8% apart).
    Distinct records collide only where a polynomial of degree ``len(shape)`` in the tables'
    random entries vanishes (Schwartz-Zippel: probability ``<= len(shape) / (2^31 - 1)``)."""
    key = (leaf, shape)
    w = _INDEX_WEIGHTS.get(key)
    if w is None:
        w = torch.ones((), dtype=torch.int64)
        for k, size in enumerate(shape):
            table = _hash_weights(-(1 + 64 * leaf + k), size)  # negative ids: apart from _hash_weights' leaves
            w = (w.unsqueeze(-1) * table) % _P31
        if len(_INDEX_WEIGHTS) >= 256:  # per-batch padding: one shape per batch size; keep the memory bounded
            _INDEX_WEIGHTS.clear()
        w = _INDEX_WEIGHTS[key] = w.reshape(-1)
    return w


def record_keys(inputs: Any, targets: Any, b: int) -> Tensor:
    """``[b]`` int64 content hashes of the records of a batch (a random linear hash of their values'
    bytes, floating leaves as float64 and integer ones as int64: the same data in another dtype has
    the same keys).

    Every tensor leaf of ``(inputs, targets)`` with ``b`` rows is hashed (pass the raw batch as
    ``inputs`` and ``None`` as ``targets`` to hash a whole batch). Deterministic across
    processes, batch compositions and loader orders: the same record always gets the same key.
    Keeping the records with the smallest keys is a *bottom-k* sample, which does not depend on
    how the records were split over batches or processes, nor on their order. A byte's weight
    depends on its position only, so zeros padded at the end of a record (sequences padded to
    each batch's longest, their attention masks) leave its key unchanged: with weights drawn per
    row length, the same records padded by batches of 4 and of 64 drew other samples and moved
    the figures by up to 2.4%. A record of several dimensions (``[b, d_1, ..., d_k]``, k >= 2)
    weighs each byte by its index in every dimension (:func:`_index_weights`), so zeros padded at
    the end of any of them leave its key unchanged too (padding with another value still
    changes the bytes: pad with 0 for batch-independent figures). An integer record's (a
    multi-dimensional record's: each last-dimension row's) trailing run of one negative value --
    an ignore index, -100 for ``F.cross_entropy``, which sequence labels are padded with, or -1 in
    a padded edge list -- is hashed as zeros, for the same reason (labels padded with -100
    to each batch's longest changed the keys with the batch).
    """
    h = torch.zeros(b, dtype=torch.int64)
    leaves = [t for t in torch.utils._pytree.tree_leaves((inputs, targets))
              if isinstance(t, Tensor) and t.dim() >= 1 and t.shape[0] == b]
    for i, t in enumerate(leaves):
        if math.prod(t.shape[1:]) == 0:  # no bytes (a batch of molecules without bonds: edges [B, 2, 0])
            h = (h * 1_000_003) % _P31  # as zero padding: the key of the same records padded to any size
            continue
        several = t.dim() > 2  # records of several dimensions: weights by multi-index
        raw = t.detach().cpu().reshape(b * (math.prod(t.shape[1:-1]) if several else 1), -1)
        # by value, not by storage: float16/bfloat16/float32 records cast exactly to float64 and
        # integers to int64, so a float64 copy of the same data keeps the same records (it drew
        # another 512 of 600 and moved the figures by 1%)
        if raw.dtype == torch.bool:
            raw = raw.to(torch.uint8)
        elif raw.is_floating_point():
            raw = raw.to(torch.float64)
        elif not raw.is_complex():
            raw = _trailing_negative_as_zero(raw.to(torch.int64))
        raw = raw.contiguous()
        if several:
            item = raw.element_size()
            u8 = raw.reshape(b, -1).view(torch.uint8)  # [b, bytes]
            w = _index_weights(i, (*t.shape[1:], item))
        else:
            u8 = raw.view(torch.uint8)  # [b, bytes]
            w = _hash_weights(i, u8.shape[1])
        L = u8.shape[1]
        # sum_j (by_j w_j mod P) = sum_j by_j w_j (mod P), summed exactly over blocks of
        # _SUM_BLOCK bytes and reduced once per block. The weights split in 16-bit halves
        # (w = 2^16 hi + lo) make it one float64 GEMM per block: each product is below 2^24 and
        # a block's sums below 2^44, integers that float64 holds exactly in any summation order,
        # so the keys are the int64 products' (which cost ~4x more: pf28). The bytes are widened
        # to float64 a few rows at a time (es33: the whole [b, bytes] float64 copy was 8x the
        # batch, ~30 MB of fresh memory per 455-record batch of 1,024 floats); each row's sum is
        # the same exact integer. The product is taken as [2, bytes] @ [bytes, rows] (the
        # halves' rows against the block's transposed view): the same exact sums, ~4x faster
        # than [rows, bytes] @ [bytes, 2], whose two-column GEMM ran at ~1 G multiply-adds/s
        # (p45b: 0.79 -> 0.29 ms a 256-record batch of 256 float32 features, 1 thread)
        halves = torch.stack([w >> 16, w & 0xFFFF]).to(torch.float64)  # [2, L]
        s = torch.zeros(b, dtype=torch.int64)
        for a in range(0, L, _SUM_BLOCK):
            e = min(a + _SUM_BLOCK, L)
            rows = max(1, _KEY_ROW_BYTES // max(1, e - a))
            hl = torch.cat([halves[:, a:e] @ u8[r: r + rows, a:e].to(torch.float64).T
                            for r in range(0, b, rows)], 1).to(torch.int64)  # [2, b]
            s = (s + hl[0] * 65536 + hl[1]) % _P31
        h = (h * 1_000_003 + s) % _P31
    return h


def _trailing_negative_as_zero(raw: Tensor) -> Tensor:
    """``raw`` ``[b, L]`` int64 with each row's trailing run of its last value set to 0 where that
    value is negative (class indices are not: it marks padding, e.g. ``ignore_index=-100``), so
    that the row's key does not depend on how far a batch padded it."""
    if raw.shape[1] < 2 or not bool((raw[:, -1] < 0).any()):
        return raw
    run = (raw == raw[:, -1:]).flip(1).to(torch.int64).cumprod(1).flip(1).bool()  # the trailing run
    return raw.masked_fill(run & (raw[:, -1:] < 0), 0)


def cat_state(x: Any) -> Any:
    """A list state (of tensors) as one tensor; tensors pass through; ``None`` for empty."""
    if isinstance(x, Tensor):
        return x
    if not x:
        return None
    if not isinstance(x[0], Tensor):
        return x
    return torch.cat([t.reshape(-1, *t.shape[1:]) if t.dim() else t.reshape(1) for t in x])


def batch_size_of(y: Any) -> int:
    """Rows of the first tensor leaf of ``y``."""
    leaves = [t for t in torch.utils._pytree.tree_leaves(y) if isinstance(t, Tensor)]
    return int(leaves[0].shape[0])


def detach_clone(t: Any) -> Any:
    return t.detach().clone() if isinstance(t, Tensor) else t


def slice_rows(tree: Any, rows: Tensor) -> Any:
    """The given rows of every tensor in a pytree."""
    return torch.utils._pytree.tree_map(
        lambda t: t[rows.to(t.device)] if isinstance(t, Tensor) else t, tree)


def slice_tree(tree: Any, a: int, b: int) -> Any:
    """Rows ``a:b`` of every tensor in a pytree."""
    return torch.utils._pytree.tree_map(lambda t: t[a:b] if isinstance(t, Tensor) else t, tree)


def split_batch(inputs: Any, targets: Any, b: int, step: int) -> Iterator[tuple[Any, Any]]:
    """``(inputs, targets)`` in row blocks of ``step`` (of ``b`` rows)."""
    for a in range(0, b, step):
        yield slice_tree(inputs, a, a + step), slice_tree(targets, a, a + step)


def kept_count(st: dict[str, Any], keep_grad: bool) -> int:
    """Records stored so far (``selection="first"``)."""
    if keep_grad:
        return sum(int(t.shape[0]) for t in st["rec_grad"])
    return sum(batch_size_of(t) for t in st["rec_y"])


def storable_rows(st: dict[str, Any], keys: Tensor | None, b: int, num_records: int, keep_grad: bool) -> Tensor:
    """Rows of a batch of ``b`` that may still be kept: the first ones while fewer than
    ``num_records`` are stored (``keys is None``), else those whose key is below the largest
    kept key (bottom-k); ``[rows]`` int64."""
    if keys is None:
        return torch.arange(min(max(num_records - kept_count(st, keep_grad), 0), b))
    stored = cat_state(st["rec_key"])
    if stored is not None and stored.numel() >= num_records:
        return torch.nonzero(keys < stored.max().cpu()).squeeze(-1)
    return torch.arange(b)


def store_records(st: dict[str, Any], flat: Tensor, x: Any, y: Any, keys: Tensor | None, *,
                  num_records: int, keep_grad: bool, pytree_records: bool) -> None:
    """Keep a batch's records in ``st`` (in place): their gradients ``flat [b, d]`` when
    ``keep_grad``, else the records ``x``, ``y`` themselves.

    Raises:
        TypeError: records (not gradients) kept by hash across processes must be tensors.
    """
    k = num_records
    if keys is None:  # the first records seen
        kept = kept_count(st, keep_grad)
        if kept >= k:
            return
        take = min(k - kept, flat.shape[0])
        if keep_grad:
            st["rec_grad"].append(flat[:take].clone())
        else:
            st["rec_x"].append(torch.utils._pytree.tree_map(lambda t: t[:take].clone(), x))
            st["rec_y"].append(torch.utils._pytree.tree_map(lambda t: t[:take].clone(), y))
        return
    # bottom-k by content hash
    if keep_grad:
        st["rec_grad"].append(flat.clone())
    elif pytree_records:
        st["rec_x"].append(torch.utils._pytree.tree_map(detach_clone, x))
        st["rec_y"].append(torch.utils._pytree.tree_map(detach_clone, y))
    else:
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise TypeError(
                "storing records across processes needs tensor inputs and targets; this model "
                f"is too large to store {k} records' gradients (num_records * d > budget): "
                "lower num_records or raise budget"
            )
        st["rec_x"].append(x.detach().clone())
        st["rec_y"].append(y.detach().clone())
    st["rec_key"].append(keys.to(st["g_sum"].device))
    prune_bottom_k(st, k)


def repeated_records(st: dict[str, Any]) -> int | None:
    """How many of the stored records repeat another stored record (equal content hash and equal
    stored row: gradients, or the record itself), ``rows - distinct``; ``None`` without keys
    (``selection="first"``) or stored rows.

    The copies of a record share its key, so the bottom-k sample keeps them together. The key
    is a 31-bit hash: with many records two different ones can share it (10^5 records: about
    2 pairs), hence the rows are compared too (within 1e-6 of their largest entry: a record's
    gradient may round differently in batches of other sizes)."""
    keys = cat_state(st.get("rec_key", []))
    if keys is None or keys.numel() < 2:
        return None if keys is None else 0

    def whole(items: Any) -> Tensor | None:
        """The stored rows as one tensor (:func:`cat_state`; no copy of a single tensor, e.g.
        after a prune); ``None`` for nothing stored or pytree records."""
        if isinstance(items, list) and len(items) == 1 and isinstance(items[0], Tensor):
            items = items[0]
        if isinstance(items, list) and items and all(isinstance(t, Tensor) for t in items) \
                and len({t.shape[1:] for t in items}) > 1 and len({t.dim() for t in items}) == 1:
            # records of batches padded to several lengths (prune_bottom_k) compared as their
            # keys read them: zeros at the end of each dimension add nothing
            width = [max(t.shape[i] for t in items) for i in range(1, items[0].dim())]
            items = [torch.nn.functional.pad(t, [p for i in reversed(range(1, t.dim()))
                                                 for p in (0, width[i - 1] - t.shape[i])]) for t in items]
        t = cat_state(items) if isinstance(items, (Tensor, list)) else None
        return t if isinstance(t, Tensor) else None

    rows = [whole(st.get("rec_grad"))]
    if rows[0] is None or rows[0].shape[0] != keys.numel():
        rows = [whole(st.get("rec_x")), whole(st.get("rec_y"))]
    if any(r is None or r.shape[0] != keys.numel() for r in rows):
        return None
    keys = keys.cpu()
    order = torch.sort(keys, stable=True).indices
    ks = keys[order]
    same = torch.nonzero(ks[1:] == ks[:-1]).squeeze(-1)
    if not same.numel():
        return 0
    equal = torch.ones(same.numel(), dtype=torch.bool)
    for r in rows:  # the pairs' rows side by side, in blocks (a row can be large)
        for c in range(0, same.numel(), 256):
            pa, pb = order[same[c: c + 256]], order[same[c: c + 256] + 1]
            ra = r[pa.to(r.device)].reshape(len(pa), -1).to("cpu", torch.float64)
            rb = r[pb.to(r.device)].reshape(len(pb), -1).to("cpu", torch.float64)
            if not ra.shape[1]:  # no stored content to compare: not counted (no false alarm on a key collision)
                equal[c: c + 256] = False
                continue
            scale = torch.maximum(ra.abs().amax(1), rb.abs().amax(1))
            equal[c: c + 256] &= (ra - rb).abs().amax(1) <= 1e-6 * scale
    return int(equal.sum())


def _row_shapes(chunk: Any) -> tuple[tuple[int, ...], ...]:
    """The trailing shapes (all but the rows) of a stored chunk's tensor leaves."""
    return tuple(tuple(t.shape[1:]) for t in torch.utils._pytree.tree_leaves(chunk) if isinstance(t, Tensor))


def _cat_chunks(chunks: list[Any]) -> Any:
    """Stored chunks (tensors or pytrees of tensors) of one row shape as one, leaf by leaf."""
    if isinstance(chunks[0], Tensor):
        return cat_state(chunks)
    return torch.utils._pytree.tree_map(
        lambda *ts: torch.cat(ts) if isinstance(ts[0], Tensor) else ts[0], chunks[0], *chunks[1:])


def prune_bottom_k(st: dict[str, Any], k: int) -> None:
    """Keep the ``k`` stored records with the smallest keys, sorted by key (in place).

    Stored records (``rec_x``/``rec_y``) of batches padded to different lengths (per-batch
    padding of sequences: token ids ``[32, 10]`` and ``[32, 12]``) cannot be one tensor: each
    record is kept as its batch padded it (the model read it so in training; a pad value cannot
    be guessed: 0 for token ids, -100 for ignored labels), one chunk per row shape, each in key
    order, and ``rec_key`` in the same order (the next prune reads the keys against the rows).
    The figures do not depend on that order (batches of 5, 7 and 32 gave equal figures
    and intervals to 1e-15); formerly ``torch.cat`` raised "Sizes of tensors must match" at
    the end of training once ``num_records * d`` exceeded ``budget``."""
    keys = cat_state(st["rec_key"])
    if keys is None:
        return
    order = torch.sort(keys.cpu(), stable=True).indices[:k]
    fields = ["rec_grad"] if "rec_grad" in st else ["rec_x", "rec_y"]
    if any(isinstance(st[f], list) and len({_row_shapes(c) for c in st[f]}) > 1 for f in fields):
        _align_chunks(st, fields)
        order = _prune_ragged(st, fields, order)
    else:
        for f in fields:
            items = st[f]
            full = _cat_chunks(items) if isinstance(items, list) else items
            sel = torch.utils._pytree.tree_map(
                lambda t: t[order.to(t.device)] if isinstance(t, Tensor) else t, full)
            if isinstance(items, list):
                items[:] = [sel]
            else:
                st[f] = sel
    sel_keys = keys[order.to(keys.device)]
    if isinstance(st["rec_key"], list):
        st["rec_key"][:] = [sel_keys]
    else:
        st["rec_key"] = sel_keys


def _align_chunks(st: dict[str, Any], fields: list[str]) -> None:
    """The stored fields as lists of chunks with the same row boundaries (in place): a field held
    as one tensor (torchmetrics' sync concatenates the targets) or chunked otherwise is cut at the
    union of every field's chunk boundaries, so ``zip`` pairs each chunk's inputs with its targets."""
    def sizes(v: Any) -> list[int]:
        return [batch_size_of(c) for c in v] if isinstance(v, list) else [batch_size_of(v)]

    bounds = sorted({int(b) for f in fields for b in torch.tensor(sizes(st[f])).cumsum(0).tolist()})
    for f in fields:
        v = st[f] if isinstance(st[f], list) else [st[f]]
        out, r0 = [], 0
        for c in v:
            r1 = r0 + batch_size_of(c)
            cuts = [r0] + [b for b in bounds if r0 < b < r1] + [r1]
            out += [slice_tree(c, a - r0, b - r0) for a, b in zip(cuts, cuts[1:])]
            r0 = r1
        if isinstance(st[f], list):
            st[f][:] = out  # in place: the list may be a Metric's state
        else:
            st[f] = out


def _prune_ragged(st: dict[str, Any], fields: list[str], order: Tensor) -> Tensor:
    """:func:`prune_bottom_k` for stored chunks of several row shapes (joint over the fields of a
    chunk: its inputs and targets): the records ``order`` (row indices over the chunks, in key
    order) as one chunk per row shape; returns the row indices in the order stored."""
    chunks = list(zip(*(st[f] for f in fields)))  # per stored chunk, one item per field
    shape_of = [sum((_row_shapes(c) for c in ch), ()) for ch in chunks]
    sizes = torch.tensor([batch_size_of(ch[0]) for ch in chunks])
    chunk_of = torch.repeat_interleave(torch.arange(len(chunks)), sizes)
    start = torch.cumsum(sizes, 0) - sizes
    shapes = sorted(set(shape_of))
    group = torch.tensor([shapes.index(shape_of[int(c)]) for c in chunk_of[order]], dtype=torch.long)
    order = order[torch.sort(group, stable=True).indices]  # by row shape, in key order within
    for j, f in enumerate(fields):
        out = []
        for sh in shapes:
            members = [i for i, s in enumerate(shape_of) if s == sh]
            rows = order[torch.isin(chunk_of[order], torch.tensor(members))]
            if not rows.numel():
                continue
            # a record's row in its shape's chunks concatenated
            offsets = torch.zeros(len(chunks), dtype=torch.long)
            offsets[members] = torch.cumsum(sizes[members], 0) - sizes[members]
            local = rows - start[chunk_of[rows]] + offsets[chunk_of[rows]]
            out.append(slice_rows(_cat_chunks([chunks[i][j] for i in members]), local))
        st[f][:] = out
    return order
