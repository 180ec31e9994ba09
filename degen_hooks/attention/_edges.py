"""Interaction-graph edges of a closed-form attention section (#19): no backward passes.

Part of :mod:`degen_hooks.attention`; mixed into
:class:`~degen_hooks.attention.AttentionSection`, whose Jacobian terms (module docstring of
:mod:`.section`) give the edges too: for each (output position, feature) the
attribution of every input feature, summed over input positions, from the layer's q, k, v and
pattern read in the graph's one forward pass. Integrated gradients move the layer to each
``alpha`` (q, k and v are affine in the input, the new pattern is
``softmax(log A + delta scores)``) without running the model again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from .. import closed_form as _closed_form
from .._errors import ShapeMismatchError
from .qk_norm import Frames

#: Most elements of one piece of attributions ``(samples, P, r', r)`` formed and squared at
#: once: small enough to stay in a core's cache between its passes.
_IN_CACHE = 2**17


class AttentionEdges:
    """The edge methods of :class:`~degen_hooks.attention.AttentionSection`."""

    def edge_batch(
        self,
        reads: dict[str, torch.Tensor],
        src: Any,
        dst: Any,
        alphas: Sequence[float],
        weights: Sequence[float],
        *,
        signs: Callable[[tuple[int, ...], torch.device], torch.Tensor] | None = None,
        elements: int | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Interaction-graph edges of one batch (lib_math §7.1), without a backward pass.

        From one forward pass of the model (``reads``, see :meth:`edge_reads`), each
        integration point ``alpha_k`` moves the layer to the rewritten input ``x_k = alpha_k
        f C_pinv + mu`` (at the input's positions, as the backward path writes it) without
        running the model: q, k and v are affine in the (normalized) input, ``q_k = q +
        (n(x_k) - n(x)) W_Q`` (rotated by the same per-position rotations), and the pattern
        is ``softmax(log A + (q_k k_k^T - q k^T) / scale)`` (masks, ALiBi and other constant
        score terms stay in ``log A``). The Jacobian rows of :meth:`jacobian_rows`, taken
        with the weights projected on the input features (``W -> C_pinv W``; through the
        norm first when there is one), are ``d f'_{t,i} / d f_{s,j}`` directly, and
        ``E_ij = sum_{b,t} (sum_s f_sj sum_k w_k d f'_{t,i} / d f_{s,j} |_k)^2``, in chunks
        of samples and output positions of about ``elements`` elements.

        Args:
            reads: The tensors :meth:`edge_reads` names, read in one forward pass.
            src: The input node layer (a graph ``NodeLayer``: ``site``, ``features``,
                ``write``, ``part``, ``pinv``, ``positions_of``) at this section's input; with
                padding its ``cells`` zero the features of padding.
            dst: The output node layer (``key``, ``rotation``, ``positions_of``; with padding
                ``cells``: no probe at padding).
            alphas: Integration points ``alpha_k``.
            weights: Integration weights ``w_k``.
            signs: ``signs(shape, device)`` draws the stochastic sources, shape
                ``(n_sources, batch, n_out_positions, 1)``; ``None`` for exact edges.
            elements: Most elements of a chunk's temporaries (default
                ``degen_hooks.closed_form.EDGE_ELEMENTS``).

        Returns:
            ``(E, n_rows)``: ``E`` of shape ``(r_next, r)``, float64, summed over the batch
            (divide by the rows), and the input rows ``batch * n_in_positions``.

        Raises:
            ShapeMismatchError: If the output layer's read-out does not fit the section.
            ValueError: For rotary embeddings applied at shifted positions (left padding,
                position_ids).
        """
        f64 = torch.float64
        elements = _closed_form.EDGE_ELEMENTS if elements is None else elements
        act = reads["x"]
        x = src.site.features_last(act).to(f64)  # (b, pos, d_in)
        f = src.features(act)  # (b, K, r)
        device = f.device
        inputs, outputs = src.positions_of(act), dst.positions_of(act)
        section, q, k, v, pattern = self._read(reads, src.padding, outputs)  # type: ignore[attr-defined]
        d_out = self.w_o.shape[2]
        readout = dst.rotation
        readout = torch.eye(d_out, dtype=f64) if readout is None else readout.detach().to(f64)
        if readout.ndim != 2 or readout.shape[0] != d_out:
            raise ShapeMismatchError(
                f"Layer {dst.key!r} reads {self.target!r} (width {d_out}) through a "
                f"{tuple(readout.shape)} matrix: it must be (d_out, r) = ({d_out}, r)."
            )
        readout = readout.to(device)
        readin = src.pinv
        readin = None if readin is None else readin.detach().to(device=device, dtype=f64)
        drawn = None if signs is None else signs((f.shape[0], len(outputs), 1), device)

        norms = section.qk_norm
        raw = None if norms is None else (norms.raw_q, norms.raw_k)

        def moved(part: slice) -> list[tuple[Any, ...]]:
            """The layer at each integration point, for the samples ``part``."""
            out = []
            for alpha in alphas:
                written = src.part(part).write(act[part], alpha * f[part])
                rewritten = src.site.features_last(written).to(f64)
                rows = None if self.norm is not None else outputs  # the direct sums' rows
                raw_part = None if raw is None else (raw[0][part], raw[1][part])
                layer = (x[part], q[part], k[part], v[part], pattern[part], rows, raw_part)
                out.append(section._moved(rewritten, *layer))
            return out

        edges = section._edge_sums(
            moved, f, x.shape[1], readin, readout, inputs, outputs, weights, drawn, elements,
            dst.cells,
        )  # fmt: skip
        return edges, f.shape[0] * f.shape[1]

    def _normalized(self, x: torch.Tensor) -> torch.Tensor:
        """The norm's output before its gain (``x`` itself without a norm)."""
        return x if self.norm is None else self._norm_of(x)[0]

    def _norm_of(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A section with a norm: its output before the gain, ``n = c / sigma``, and
        ``sigma = sqrt(mean(c^2) + eps)`` (``(..., 1)``), ``c`` the input (centred for a
        LayerNorm)."""
        if self.norm in ("LN", "LNPre"):
            x = x - x.mean(-1, keepdim=True)
        sigma = (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
        return x / sigma, sigma

    def _moved(
        self,
        x_new: torch.Tensor,
        x: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pattern: torch.Tensor,
        rows: torch.Tensor | None = None,
        raw: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[Any, ...]:
        """``(q, k, v, pattern, x, frames)`` of the layer at the input ``x_new`` (``(b, pos,
        d_in)``), from its values at ``x``: q, k and v are affine in the normalized input, and
        the scores change by ``(q' k'^T - q k^T) / scale`` (see :meth:`edge_batch`). With
        ``rows`` (query positions), q and the pattern only at those rows. With norms of q and
        k, ``raw`` holds their raw projections at ``x``: the moved ones are normed again (and
        ``frames`` are theirs, else ``None``)."""
        change = self._normalized(x_new) - self._normalized(x)
        n, n_pos, d_in = change.shape
        # One product for q, k and v: (b pos, d_in) x (d_in, 3 h e).
        weights = torch.cat(
            [w.to(x.device).transpose(0, 1) for w in (self.w_q, self.w_k, self.w_v)], 1
        )
        shifts = (change.reshape(-1, d_in) @ weights.reshape(d_in, -1)).view(
            n, n_pos, 3, *q.shape[2:]
        )
        shift_q, shift_k = shifts[:, :, 0], shifts[:, :, 1]
        frames = None
        if self.qk_norm is not None:  # normed again, then rotated
            if raw is None or self.rotary is None:
                raise ValueError("Norms of q and k need their raw projections and rotary tables.")
            frames = self.qk_norm.frames(raw[0] + shift_q, raw[1] + shift_k)
            moved_q = self.rotary.rotate(frames.q.normalized)
            shift_q, shift_k = moved_q - q, self.rotary.rotate(frames.k.normalized) - k
        elif self.rotary is not None:  # rotated vectors: the rotation is linear
            shift_q, shift_k = self.rotary.rotate(shift_q), self.rotary.rotate(shift_k)
        if rows is not None:
            q, shift_q, pattern = q[:, rows], shift_q[:, rows], pattern[:, :, rows]
        q_new, k_new, v_new = q + shift_q, k + shift_k, v + shifts[:, :, 2]
        scores = torch.einsum("bqhe,bkhe->bhqk", q_new, k_new)
        scores -= torch.einsum("bqhe,bkhe->bhqk", q, k)
        # Masked keys have A = 0, log A = -inf: they stay masked. A query that sees no key
        # (a row of -inf) gets a zero row, as TransformerLens sets its NaNs to zero.
        pattern_new = torch.softmax(pattern.log() + scores / self.scale, dim=-1).nan_to_num(0.0)
        return q_new, k_new, v_new, pattern_new, x_new, frames

    def _edge_sums(
        self,
        moved: Callable[[slice], list[tuple[Any, ...]]],
        f: torch.Tensor,
        n_keys: int,
        readin: torch.Tensor | None,
        readout: torch.Tensor,
        inputs: torch.Tensor,
        outputs: torch.Tensor,
        weights: Sequence[float],
        signs: torch.Tensor | None,
        elements: int,
        probed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Edge sums from the layer's ``(q, k, v, pattern, x)`` at each integration point
        (``moved(samples)`` gives them for a chunk of samples); ``probed`` ``(b, n_out)``
        weights each (sequence, output position) (0: padding, no probe), ``None``: 1.

        Without a norm, every ``d_in`` index of the rows comes from ``W_Q``, ``W_K`` or
        ``W_V`` (or the skip connection), so ``C_pinv W`` replaces ``W`` and the sum over
        input positions is taken inside the products (:meth:`_direct_pieces`): the
        attributions of every integration point are one batched product plus one term per
        head (and the skip connection), formed and squared a few samples at a time, in
        pieces that stay in cache. A norm acts on ``d_in`` between them: the rows of
        :meth:`jacobian_rows` are formed in ``d_in``, taken through the norm and projected
        (:meth:`_rows_attributions`).
        """
        f64 = torch.float64
        device = f.device
        n_heads, d_head = self.w_q.shape[0], self.w_q.shape[2]
        r, r_next = f.shape[-1], readout.shape[1]
        weight = torch.as_tensor(list(weights), dtype=f64, device=device)
        skip = None
        if self.residual:  # d y_t / d x_t = I: R^T, in feature coordinates (C_pinv R)^T
            skip = weight.sum() * (readout.T if readin is None else (readin @ readout).T)
        n = f.shape[0]
        n_in, n_out = len(inputs), len(outputs)
        # The input features at each key position (summed where an input repeats), and at
        # each output position (where it is an input too: the query and skip terms).
        spread = torch.zeros(n, n_keys, r, dtype=f64, device=device).index_add_(1, inputs, f)
        at_output = spread[:, outputs]
        if self.norm is None:
            section = self
            if readin is not None:
                w_q, w_k, w_v = (
                    torch.einsum("ja,hae->hje", readin, w.to(device))
                    for w in (self.w_q, self.w_k, self.w_v)
                )
                section = replace(self, w_q=w_q, w_k=w_k, w_v=w_v)
            wor = torch.einsum("hed,dr->her", section.w_o.to(device), readout)  # W_O^h R
            values = torch.einsum("hje,her->hrj", section.w_v.to(device), wor)  # (h, r', r)
            if skip is not None:  # the skip connection: one more "head", on f at p
                values = torch.cat([values, skip[None]])
            per_output = len(weight) * n_heads * n_keys * (2 * r_next + 3 * r + d_head)
        else:
            per_output = n_in * r_next * (self.d_in + r) + n_heads * n_keys * (r_next + d_head)
            per_output += 2 * r_next * r
        # Chunks of samples and output positions: memory O(elements), not O(samples). The
        # (samples, r', r) attributions are formed a few samples at a time (O(_IN_CACHE)).
        out_step = max(1, min(n_out, elements // per_output))
        step = max(1, elements // (per_output * out_step))
        edges = torch.zeros(r_next, r, dtype=f64, device=device)
        for start in range(0, n, step):
            part = slice(start, start + step)
            layers = moved(part)
            mixed = None
            for first in range(0, n_out, out_step):
                block = slice(first, first + out_step)
                scale = None if probed is None else probed[part, block].to(f64)
                if self.norm is None:
                    form = section._direct_sum(  # q, pattern: output rows
                        layers, weight, block, wor, values, spread[part], at_output[part, block],
                        outputs[block], scale,
                    )  # fmt: skip
                else:
                    form = self._rows_sum(
                        layers, weight, block, readin, readout, inputs, outputs, f[part], skip,
                        at_output[part, block], scale,
                    )  # fmt: skip
                b, n_block = at_output[part, block].shape[:2]
                sub_step = max(1, _IN_CACHE // (n_block * r_next * r))
                for sub_start in range(0, b, sub_step):
                    sub = slice(sub_start, sub_start + sub_step)
                    attribution = form(sub)  # (b_sub, P_block, r', r)
                    if signs is None:
                        edges += attribution.square_().sum((0, 1))
                        continue
                    # Output positions mixed by signs before squaring: sum the blocks.
                    rows = slice(start + sub.start, start + min(sub.stop, b))
                    term = torch.einsum("sbp,bpij->sbij", signs[:, rows, block, 0], attribution)
                    if mixed is None:
                        mixed = torch.zeros(signs.shape[0], b, r_next, r, dtype=f64, device=device)
                    mixed[:, sub] += term
            if mixed is not None:
                edges += mixed.square().sum((0, 1))
        return edges

    def _rows_sum(
        self,
        layers: list[tuple[Any, ...]],
        weight: torch.Tensor,
        block: slice,
        readin: torch.Tensor | None,
        readout: torch.Tensor,
        inputs: torch.Tensor,
        outputs: torch.Tensor,
        f: torch.Tensor,
        skip: torch.Tensor | None,
        at_output: torch.Tensor,
        scale: torch.Tensor | None,
    ) -> Callable[[slice], torch.Tensor]:
        """Through a norm: the chunk's attributions (``_rows_attributions`` of each
        integration point, weighted, plus the skip connection, times ``scale``), sliced by
        samples."""
        attribution = None
        for (q, k, v, pattern, x, qk), w in zip(layers, weight, strict=True):
            term = self._rows_attributions(
                q, k, v, pattern, x, readin, readout, inputs, outputs[block], f, qk
            )
            if attribution is None:
                attribution = term if float(w) == 1.0 else term.mul_(w)
            else:
                attribution.add_(term, alpha=float(w))
        assert attribution is not None
        if skip is not None:
            attribution.addcmul_(at_output[:, :, None, :], skip)
        if scale is not None:
            attribution *= scale[:, :, None, None]
        return lambda sub: attribution[sub]

    def _direct_sum(
        self,
        layers: list[tuple[Any, ...]],
        weight: torch.Tensor,
        block: slice,
        wor: torch.Tensor,
        values: torch.Tensor,
        spread: torch.Tensor,
        at_output: torch.Tensor,
        outputs: torch.Tensor,
        scale: torch.Tensor | None,
    ) -> Callable[[slice], torch.Tensor]:
        """Without a norm: the chunk's attributions, summed over the integration points
        with their weights and times ``scale``, as a function of a slice of samples that
        forms them (``values`` holds the skip connection as a last head when there is one).

        The attributions are linear in :meth:`_direct_pieces`' ``lhs`` and head weights for
        fixed ``rhs``: the points' pieces are stacked along the product's inner axis, and
        ``scale`` multiplies the left factors only."""
        lhs, rhs, heads = [], [], None
        for (q, k, v, pattern, _, qk), w in zip(layers, weight, strict=True):
            left, right, mixed = self._direct_pieces(
                q[:, block], k, v, pattern[:, :, block], wor, spread, at_output, outputs, qk
            )
            lhs.append(left if float(w) == 1.0 else left.mul_(w))
            rhs.append(right)
            heads = mixed.mul_(w) if heads is None else heads.add_(mixed, alpha=float(w))
        assert heads is not None
        if len(values) > heads.shape[2]:  # the skip connection, weighted by sum(w) already
            heads = torch.cat([heads, at_output[:, :, None]], 2)
        left = lhs[0] if len(lhs) == 1 else torch.cat(lhs, -1)
        right = rhs[0] if len(rhs) == 1 else torch.cat(rhs, -2)
        if scale is not None:
            left = left * scale[:, :, None, None]
            heads = heads * scale[:, :, None, None]

        return lambda sub: _formed(left[sub], right[sub], heads[sub], values)

    def _direct_pieces(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pattern: torch.Tensor,
        wor: torch.Tensor,
        spread: torch.Tensor,
        at_output: torch.Tensor,
        outputs: torch.Tensor,
        qk: Frames | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The factors of :meth:`_direct_attributions`: ``(lhs, rhs, heads)`` of shapes
        ``(b, P, r', h L)``, ``(b, P, h L, r)`` and ``(b, P, h, r)``, with the attributions
        ``lhs @ rhs + sum_h heads[:, :, h, None] * values[h]``."""
        n, n_heads, n_keys = q.shape[0], q.shape[2], v.shape[1]
        n_out, r_next = len(outputs), wor.shape[2]
        a = pattern  # (b, h, P, L): the output rows
        vw = torch.einsum("blhe,her->bhlr", v, wor)  # (b, h, L, r')
        zw = a @ vw  # z_hp W_O^h R: (b, h, P, r')
        g = a[..., None] * (vw[:, :, None] - zw[:, :, :, None])  # (b, h, P, L, r')
        w_q, w_k = self.w_q.to(q.device), self.w_k.to(q.device)
        if self.rotary is None:
            keys = torch.einsum("hje,bphe->bphj", w_k, q) / self.scale
            queries = torch.einsum("hje,blhe->bhlj", w_q, k) / self.scale
            rhs = keys[:, :, :, None] * spread[:, None, None]  # (b, P, h, L, r)
            rhs += queries[:, None] * at_output[:, :, None, None]
        else:  # q and k rotated: back to the key position l, and to the query position p
            every = torch.arange(n_keys, device=q.device)
            key_at = self.rotary.unrotate(q[:, :, None], every[None, :])  # (b, P, L, h, e)
            query_at = self.rotary.unrotate(k[:, None], outputs[:, None].expand(-1, n_keys))
            if qk is not None:
                key_at = qk.k.pull(key_at, expand=(1,))
                query_at = qk.q.at(outputs).pull(query_at, expand=(2,))
            keys = torch.einsum("hje,bplhe->bphlj", w_k, key_at) / self.scale
            queries = torch.einsum("hje,bplhe->bphlj", w_q, query_at) / self.scale
            rhs = keys * spread[:, None, None] + queries * at_output[:, :, None, None]
        lhs = g.permute(0, 2, 4, 1, 3).reshape(n, n_out, r_next, n_heads * n_keys)
        heads = (a @ spread[:, None]).transpose(1, 2)  # sum_l A_hpl f_l: (b, P, h, r)
        return lhs, rhs.reshape(n, n_out, n_heads * n_keys, -1), heads

    def _direct_attributions(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pattern: torch.Tensor,
        wor: torch.Tensor,
        values: torch.Tensor,
        spread: torch.Tensor,
        at_output: torch.Tensor,
        outputs: torch.Tensor,
        qk: Frames | None = None,
    ) -> torch.Tensor:
        """``sum_s d f'_{p,i} / d f_{s,j} f_{s,j}``, shape ``(b, P, r', r)``, without a norm.

        ``q`` and ``pattern`` hold the output rows ``outputs`` only. The section's ``W_Q``,
        ``W_K``, ``W_V`` are already projected on the input features (``d_in`` is ``r``);
        ``spread`` holds the features at each key position ``(b, L, r)`` and ``at_output``
        at each output position ``(b, P, r)``. The skip
        connection is left out. With ``g_hpli = A_hpl (v_hl - z_hp) W_O^h R`` (how the
        score ``s_hpl`` moves ``y_p``):

        * values: ``sum_h (sum_l A_hpl f_l) (W_V^h W_O^h R)``;
        * keys and queries, one batched product over ``(h, l)``: ``sum_hl g_hpli
          (key_hpl f_l + query_hpl f_p)``, ``key = W_K^h q_hp / scale`` (rotated back to
          ``l``), ``query = W_Q^h k_hl / scale`` (rotated back to ``p``; with norms of q and
          k, ``qk`` their frames, both then through the norm's ``P (gamma * .)``).
        """
        pieces = self._direct_pieces(q, k, v, pattern, wor, spread, at_output, outputs, qk)
        return _formed(*pieces, values)

    def _rows_attributions(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pattern: torch.Tensor,
        x: torch.Tensor,
        readin: torch.Tensor | None,
        readout: torch.Tensor,
        inputs: torch.Tensor,
        outputs: torch.Tensor,
        f: torch.Tensor,
        qk: Frames | None = None,
    ) -> torch.Tensor:
        """As :meth:`_direct_attributions`, through the norm: the rows of
        :meth:`jacobian_rows` (``(b, P, K, r', d_in)``, skip left out), projected on the
        input features and summed over input positions."""
        ones = torch.ones(len(outputs), dtype=q.dtype, device=q.device)
        rows = replace(self, residual=False).jacobian_rows(
            q, k, v, pattern, readout, inputs, outputs, ones, None, x, qk
        )
        if readin is not None:
            rows = rows @ readin.T
        return torch.einsum("bpkij,bkj->bpij", rows, f)


def _formed(
    lhs: torch.Tensor, rhs: torch.Tensor, heads: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """The attributions ``lhs @ rhs + sum_h heads[:, :, h, None] * values[h]``
    (:meth:`AttentionEdges._direct_pieces`), ``(b, P, r', r)``."""
    attribution = lhs @ rhs
    for head in range(len(values)):
        attribution.addcmul_(heads[:, :, head, None, :], values[head])
    return attribution
