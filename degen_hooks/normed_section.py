"""Closed-form Jacobian Gram of a norm followed by an MLP, plain or gated (#16).

Language-model blocks put a LayerNorm or RMSNorm before the MLP (GPT-2, Pythia, Llama,
Mistral, Qwen, Gemma), many gate the MLP (SwiGLU, GeGLU), and the unembedding follows a final
norm. :class:`NormedMLPSection` covers all of these, residual or not:

    y = [x +] W_out h(z),   z = W_in n(x) + b,   n(x) = N(x) (times the gain, folded into W_in)

with ``h = sigma(z)`` (plain) or ``h = sigma(g) * u`` for ``z = (g, u)`` (gated: ``W_in``
stacks the gate and up projections). Rows are samples; the derivation is in the column
convention of lib_math §12.

**The Jacobian.** The norm's Jacobian is ``D(x) = (1/s)(C - N N^T/d)``, with ``N`` the normed
input before its gain, ``s`` its scale (``sqrt(var + eps)`` for LayerNorm,
``sqrt(mean x^2 + eps)`` for RMSNorm), ``d`` the width and ``C = I - 1 1^T/d`` (LayerNorm,
which centres) or ``C = I`` (RMSNorm). The MLP's is ``W_out' diag(a) W_in`` with ``a =
sigma'(z)`` (plain, ``W_out' = W_out``) or, gated, ``a = (sigma'(g) * u, sigma(g))`` and
``W_out' = [W_out, W_out]``: ``dh = diag(sigma'(g) u) dg + diag(sigma(g)) du``. So
``J = [I +] W_out' diag(a) W_in D(x)``: a plain MLP of hidden width ``2 d_mlp`` for a gated
one, and the derivative vector ``a`` is a function of the pre-activations.

**The Gram** ``G = E[J^T Q J]`` (``Q = R R^T``, the read-out of the next site). With ``P =
W_in C``, ``v = W_in N = z - b`` and ``M^T Q M = W_in^T diag(a) K diag(a) W_in``, ``K =
W_out'^T Q W_out'``, the product ``W_in D = (P - v N^T/d)/s`` gives

    E[D M^T Q M D] = P^T (K * E[a a^T/s^2]) P - T - T^T + E[c N N^T/s^2]/d^2,
    T = P^T E[w N^T/s^2]/d,   w = a * K (a * v),   c = v . w,

and a residual section adds ``Q + X + X^T`` with ``X = Q W_out' (diag(E[a/s]) P - E[(a * v/s)
N^T]/d)``. Every expectation is an ``O(d_hidden^2)`` or ``O(d_hidden d)`` accumulator, filled
by matrix products over a batch's rows: no backward pass, memory independent of the samples.
Without a norm ``D = I``: the first term alone, with ``s = 1`` (lib_math §12's MLP section).
A linear section (``sigma`` the identity, e.g. the final norm and unembedding) has a constant
``L = M^T Q M`` (``d x d``, never ``d_hidden^2``) and ``E[D L D] = E[1/s^2] C L C - (C L
E[N N^T/s^2] + transpose)/d + E[(N^T L N/s^2) N N^T]/d^2``.

The statistics need the read-out ``Q``, known only once the next site's basis is built, so
the section runs a forward pass of its own (:meth:`NormedMLPSection.gram_pass`, the protocol
of the attention section), reading the section's input and stopping the forward pass there
or, when the family names it (``hidden``), at the MLP's hidden activation and the section's
output, which each batch checks against the section's (the output on random directions,
``[x +] h W_out^T + b_out`` for the model's own ``h``): a hook of the user's that changes the
MLP is refused, never silently left out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ._errors import ShapeMismatchError
from ._normed_checks import NormedChecks
from ._normed_edges import NormedEdges
from ._positions import same_positions
from ._read_pass import SiteReader
from .accumulators import SecondMoment
from .closed_form import activation_derivative
from .sites import Site

__all__ = ["NormedMLPSection"]

_NORM_KINDS = ("LN", "RMS", None)
#: Most elements of a chunk's ``(rows, d_hidden)`` temporaries.
_ELEMENTS = 2**22

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda z: F.gelu(z, approximate="tanh"),
    "gelu_fast": lambda z: F.gelu(z, approximate="tanh"),
    "gelu_pytorch_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "identity": lambda z: z,
    "linear": lambda z: z,
}


@dataclass(frozen=True, eq=False)
class NormedMLPSection(NormedEdges, NormedChecks):
    """A LayerNorm/RMSNorm (or none) then an MLP (plain or gated), optionally residual.

    Attributes:
        w_in: ``(d_hidden, d_in)`` with the norm's gain folded in (``W_in diag(gain)``);
            gated: the gate rows, then the up rows (``d_hidden = 2 d_mlp``).
        w_out: ``(d_out, d_mlp)``, or ``None`` when the section ends at the hidden layer
            (``d_out = d_hidden``; not gated).
        bias: ``b``, shape ``(d_hidden,)``, with ``z = n(x) W_in^T + b`` (the norm's bias
            folded in: ``W_in beta + b_in``); ``None`` for zero.
        activation: Name of ``sigma`` (see :func:`~degen_hooks.activation_derivative`).
        norm: ``"LN"`` (LayerNorm, centres), ``"RMS"`` or ``None`` (no norm).
        eps: The norm's epsilon.
        residual: ``True`` for ``y = x + MLP(n(x))`` (needs ``d_out == d_in``).
        gated: ``h = sigma(gate) * up``.
        hidden: The site of the model's hidden activation ``h`` (the output projection's
            input), or ``None``. Each batch then checks it against the section's ``h (+
            hidden_bias)`` at the rows read, and refuses a batch where the model computes
            another one (a hook of the user's, a layer the section does not describe).
        hidden_bias: What the model adds to ``h`` before ``hidden`` (a constant, which the
            Jacobian does not see), or ``None``.
        out_bias: The output projection's bias ``b_out`` (``y = [x +] h W_out^T + b_out``),
            or ``None`` for zero. With ``hidden`` and ``w_out``, each batch also reads the
            section's output site and checks it against ``[x +] h W_out^T + b_out``, ``h``
            the model's own: a hook that changes the MLP's output is refused too.

    Examples:
        The Gram equals exact backward probes (here a pre-norm residual block):

        >>> import torch, degen_hooks as dh
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> norm, mlp = nn.LayerNorm(4).double(), nn.Sequential(
        ...     nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4)).double()
        >>> block = nn.Sequential(norm, mlp)
        >>> section = NormedMLPSection(
        ...     mlp[0].weight.detach() * norm.weight.detach(),
        ...     mlp[2].weight.detach(),
        ...     bias=mlp[0].weight.detach() @ norm.bias.detach() + mlp[0].bias.detach(),
        ...     activation="gelu", norm="LN", eps=norm.eps)
        >>> x = torch.randn(32, 4, dtype=torch.float64)
        >>> closed = section.gram_pass(block, [x], dh.Site("0", io="input"), dh.Site("1"),
        ...                            progress=False).second_moment()
        >>> with dh.collect(block, [dh.Site("0", io="input")], jacobians="exact",
        ...                 target="1") as run:
        ...     _ = block(x.requires_grad_())
        ...     run.backward()
        >>> torch.allclose(closed, run.stats["0:input"].grads.second_moment(), rtol=1e-10)
        True
    """

    w_in: torch.Tensor
    w_out: torch.Tensor | None
    bias: torch.Tensor | None = None
    activation: str = "relu"
    norm: str | None = "LN"
    eps: float = 1e-5
    residual: bool = False
    gated: bool = False
    hidden: Site | None = None
    hidden_bias: torch.Tensor | None = None
    out_bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.norm not in _NORM_KINDS:
            raise ValueError(f"norm must be 'LN', 'RMS' or None, got {self.norm!r}.")
        activation_derivative(self.activation)  # raises for an unknown name
        if self.gated and self.activation.lower() not in _ACTIVATIONS:
            raise ValueError(
                f"A gated section needs the activation's values; {self.activation!r} is not "
                f"among {sorted(_ACTIVATIONS)}."
            )
        d_hidden, d_in = self.w_in.shape
        if self.gated and (d_hidden % 2 or self.w_out is None):
            raise ShapeMismatchError(
                f"A gated section stacks the gate and up rows in w_in (an even number of "
                f"rows, got {d_hidden}) and needs w_out."
            )
        if self.w_out is not None and self.w_out.shape[1] != self.d_mlp:
            raise ShapeMismatchError(
                f"w_in {tuple(self.w_in.shape)} and w_out {tuple(self.w_out.shape)} disagree "
                f"on d_mlp ({self.d_mlp}{' = d_hidden / 2, gated' if self.gated else ''})."
            )
        if self.bias is not None and tuple(self.bias.shape) != (d_hidden,):
            raise ShapeMismatchError(
                f"bias has shape {tuple(self.bias.shape)}; it must be (d_hidden,) = ({d_hidden},)."
            )
        if self.out_bias is not None and tuple(self.out_bias.shape) != (self.d_out,):
            raise ShapeMismatchError(
                f"out_bias has shape {tuple(self.out_bias.shape)}; it must be (d_out,) = "
                f"({self.d_out},)."
            )
        if self.residual and (self.w_out is None or self.d_out != d_in):
            raise ShapeMismatchError(
                f"A residual section needs w_out and d_out == d_in, got d_out {self.d_out} "
                f"and d_in {d_in}."
            )

    @property
    def d_mlp(self) -> int:
        """Width of the activation ``h`` (half of ``w_in``'s rows when gated)."""
        return self.w_in.shape[0] // 2 if self.gated else self.w_in.shape[0]

    @property
    def d_out(self) -> int:
        """Width of the section's output."""
        return self.w_in.shape[0] if self.w_out is None else self.w_out.shape[0]

    @property
    def is_linear(self) -> bool:
        """An identity activation, not gated: the MLP's Jacobian is constant."""
        return self.activation.lower() in ("identity", "linear") and not self.gated

    def gram_pass(
        self,
        model: nn.Module,
        data: Iterable[Any],
        site: Site,
        target: Site,
        readout: torch.Tensor | None = None,
        *,
        forward: Callable[[nn.Module, Any], Any] | None = None,
        mask: Callable[[Any], torch.Tensor | None] | None = None,
        progress: bool = True,
    ) -> SecondMoment:
        """One forward pass over ``data``: the Jacobian Gram of ``site`` read through ``target``.

        Equal to the Gram ``dh.collect(model, [site], jacobians="exact", target=target,
        readout=readout)`` accumulates, without a backward pass (with ``mask``, under
        ``run.set_mask(mask(batch))``). Each forward pass stops once ``site`` (the section's
        input, before the norm) is read.

        Args:
            model: The model holding the section.
            data: Batches (``forward(model, batch)``, default ``model(batch)``).
            site: The section's input; its positions are the samples.
            target: The section's output, at the same positions (the section acts position
                by position).
            readout: ``(d_out, r)``; identity when ``None``.
            forward: ``forward(model, batch) -> output``.
            mask: ``mask(batch) -> (batch, pos)`` boolean mask of the real tokens: padding
                is no sample (``"last"``: each row's last real token).
            progress: Show a tqdm progress bar.

        Returns:
            The Gram as a :class:`~degen_hooks.SecondMoment` over the site's samples.

        Raises:
            ShapeMismatchError: If the positions differ, the readout or a mask does not fit,
                or the site's width is not the section's.
            RuntimeError: If a forward pass never reaches ``site``.
        """
        from tqdm.auto import tqdm

        if not same_positions(site.positions, target.positions):
            raise ShapeMismatchError(
                f"The section acts position by position, but {site.key!r} and {target.key!r} "
                "read different positions: give both sites the same positions."
            )
        moments = _Moments(self, readout)
        reads = self.edge_reads(site, target)
        reader = SiteReader(model, reads, forward, what="The norm and MLP section")
        resolved = {role: found[0] for role, found in reader.resolved.items()}
        total = len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
        desc = f"jacobians {site.key} (closed form)"
        for batch in tqdm(data, desc=desc, total=total, disable=not progress, leave=False):
            captured, _, _ = reader(batch)  # stops once the input (and h) are read
            padding = None if mask is None else mask(batch)
            rows = resolved["x"].rows(captured["x"], padding)
            if "h" in captured:
                self.check_reads(rows, captured, resolved, padding, site.key)
            moments.update(rows)
        return SecondMoment.from_matrix(moments.gram(), moments.n)

    # -- per-row quantities -----------------------------------------------------------------
    def normed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, s)``: the normed rows before the gain, and each row's scale ``(n, 1)``."""
        if self.norm is None:
            return x, torch.ones_like(x[:, :1])
        if self.norm == "LN":
            x = x - x.mean(-1, keepdim=True)
        scale = (x.square().mean(-1, keepdim=True) + self.eps).sqrt()
        return x / scale, scale

    def slopes(self, z: torch.Tensor) -> torch.Tensor:
        """``a``: ``sigma'(z)``, or gated ``(sigma'(g) * u, sigma(g))`` for ``z = (g, u)``."""
        name = self.activation.lower()
        if not self.gated:
            return activation_derivative(name)(z)
        gate, up = z.chunk(2, dim=-1)
        return torch.cat([activation_derivative(name)(gate) * up, _ACTIVATIONS[name](gate)], -1)


class _Moments:
    """The streaming expectations of the module docstring, for one read-out."""

    def __init__(
        self, section: NormedMLPSection, readout: torch.Tensor | None, accumulate: bool = True
    ) -> None:
        f64 = torch.float64
        self.section = s = section
        self.w_in = s.w_in.detach().to(f64)
        device = self.w_in.device
        self.bias = None if s.bias is None else s.bias.detach().to(device, f64)
        d_hidden, self.d = self.w_in.shape
        if readout is not None:
            readout = readout.detach().to(device, f64)
            if readout.ndim != 2 or readout.shape[0] != s.d_out:
                raise ShapeMismatchError(
                    f"Readout of shape {tuple(readout.shape)} cannot read the section output "
                    f"of width {s.d_out}: it must be a (d_out, r) = ({s.d_out}, r) matrix."
                )
        w_out = None if s.w_out is None else s.w_out.detach().to(device, f64)
        if s.gated:
            w_out = torch.cat([w_out, w_out], 1)  # type: ignore[list-item]
        # B = R^T W_out' (r x d_hidden): K = B^T B, never formed when r is small.
        if w_out is None:
            self.b_out = readout.T if readout is not None else None
        else:
            self.b_out = w_out if readout is None else readout.T @ w_out
        self.q_w_out = (  # Q W_out' for the residual cross term, (d, d_hidden)
            None
            if not s.residual
            else (w_out if readout is None else readout @ (readout.T @ w_out))  # type: ignore[operator]
        )
        self.readout = readout
        self.n = 0
        centre = s.norm == "LN"
        self.p = self.w_in - self.w_in.mean(1, keepdim=True) if centre else self.w_in
        if accumulate:
            self._allocate(device)

    def _allocate(self, device: torch.device) -> None:
        s, f64 = self.section, torch.float64
        d_hidden = self.w_in.shape[0]
        zeros = torch.zeros
        if s.is_linear:
            m = self.w_in if self.b_out is None else self.b_out @ self.w_in  # (r, d)
            self.l_mat = m.T @ m  # L = M^T Q M, (d, d)
            self.inv_s2 = 0.0
            self.nn2 = zeros(self.d, self.d, dtype=f64, device=device)
        else:
            self.a2 = zeros(d_hidden, d_hidden, dtype=f64, device=device)
            self.w_n = zeros(d_hidden, self.d, dtype=f64, device=device)
        self.c_nn = zeros(self.d, self.d, dtype=f64, device=device)
        if s.residual:
            self.a1 = zeros(d_hidden, dtype=f64, device=device) if not s.is_linear else 0.0
            self.av_n = zeros(d_hidden, self.d, dtype=f64, device=device)
            self.nn1 = zeros(self.d, self.d, dtype=f64, device=device)

    def update(self, x: torch.Tensor) -> None:
        """Add a batch of input rows ``(n, d_in)``."""
        if x.shape[-1] != self.d:
            raise ShapeMismatchError(
                f"The section's input has width {self.d}, but the site gives rows of width "
                f"{x.shape[-1]}: build the section for this site."
            )
        rows = max(1, _ELEMENTS // max(self.w_in.shape[0], self.d))
        for chunk in x.to(torch.float64).split(rows):
            self._chunk(chunk)
            self.n += chunk.shape[0]

    def _chunk(self, x: torch.Tensor) -> None:
        s = self.section
        normed, scale = s.normed(x)
        if s.is_linear:
            over = normed / scale
            self.inv_s2 += float(scale.reciprocal().square().sum())
            self.nn2 += over.T @ over
            if s.norm is not None:
                quad = ((over @ self.l_mat) * over).sum(-1, keepdim=True)  # N^T L N / s^2
                self.c_nn += (normed * quad).T @ normed
            if s.residual:
                self.a1 += float(scale.reciprocal().sum())
                self.nn1 += (normed / scale).T @ normed
            return
        v = normed @ self.w_in.T
        z = v if self.bias is None else v + self.bias
        a = s.slopes(z)
        a_over = a / scale
        self.a2 += a_over.T @ a_over
        if s.norm is not None:
            av = a * v
            kav = av if self.b_out is None else (av @ self.b_out.T) @ self.b_out  # K (a*v)
            w = a * kav
            c = (av * kav).sum(-1, keepdim=True)  # (a*v)^T K (a*v)
            self.w_n += (w / scale.square()).T @ normed
            self.c_nn += (normed * (c / scale.square())).T @ normed
        if s.residual:
            self.a1 += a_over.sum(0)
            if s.norm is not None:
                self.av_n += (a * v / scale).T @ normed

    def gram(self) -> torch.Tensor:
        """``G = E[J^T Q J]``, ``(d_in, d_in)``."""
        s, n, d = self.section, max(self.n, 1), self.d
        centred = s.norm == "LN"
        if s.is_linear:
            lc = self.l_mat
            if centred:
                lc = lc - lc.mean(1, keepdim=True)
                lc = lc - lc.mean(0, keepdim=True)  # C L C
            if s.norm is None:
                gram = self.l_mat.clone()
            else:
                cl_nn = self.l_mat @ self.nn2 / n
                if centred:
                    cl_nn = cl_nn - cl_nn.mean(0, keepdim=True)
                gram = self.inv_s2 / n * lc - (cl_nn + cl_nn.T) / d + self.c_nn / (n * d * d)
        else:
            k = self._k()
            gram = self.p.T @ ((k * (self.a2 / n)) @ self.p)
            if s.norm is not None:
                t = self.p.T @ self.w_n / (n * d)
                gram = gram - t - t.T + self.c_nn / (n * d * d)
        if s.residual:
            q = self._q()
            if s.is_linear:
                m = self.w_in if self.q_w_out is None else self.q_w_out @ self.w_in
                d_mean = self._mean_norm_jacobian(n)
                cross = m @ d_mean
            else:
                cross = self.q_w_out @ (self.a1[:, None] / n * self.p)
                if s.norm is not None:
                    cross = cross - self.q_w_out @ self.av_n / (n * d)
            gram = gram + q + cross + cross.T
        return (gram + gram.T) / 2

    def _k(self) -> torch.Tensor:
        if self.b_out is None:
            return torch.eye(self.w_in.shape[0], dtype=torch.float64, device=self.w_in.device)
        return self.b_out.T @ self.b_out

    def _q(self) -> torch.Tensor:
        if self.readout is None:
            return torch.eye(self.d, dtype=torch.float64, device=self.w_in.device)
        return self.readout @ self.readout.T

    def _mean_norm_jacobian(self, n: int) -> torch.Tensor:
        """``E[D(x)]`` of a linear residual section."""
        s, d = self.section, self.d
        eye = torch.eye(d, dtype=torch.float64, device=self.w_in.device)
        if s.norm is None:
            return eye
        c = eye - 1.0 / d if s.norm == "LN" else eye
        return self.a1 / n * c - self.nn1 / (n * d)
