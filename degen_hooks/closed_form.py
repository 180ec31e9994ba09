"""Closed-form Jacobian Gram of MLP sections: no backward passes (lib_math §12).

For a section ``x -> z = W_in x + b_in -> h = sigma(z) -> y = W_out h + b_out`` (column form,
``nn.Linear`` weight layout) read out through a fixed matrix ``R`` (``y_hat = R^T y``), the
Jacobian is ``J(x) = R^T W_out diag(sigma'(z)) W_in`` and

    M' = E[J^T J] = W_in^T ((W_out^T R R^T W_out) * E[sigma'(z) sigma'(z)^T]) W_in,

with ``*`` the elementwise product. The only data statistic is the second moment of the
derivative vector ``sigma'(z)``, collected in the same forward pass as the activation Gram; for
ReLU it is the co-firing matrix. A residual section ``y = x + MLP(x)`` adds the identity to
``J`` and needs ``E[sigma'(z)]`` as well.

The same Jacobian gives the interaction-graph edges (lib_math §7.1) without backward passes:
:meth:`MLPSection.edge_sums` forms every row's Jacobian in feature coordinates from the
section's captured input and pre-activations, a few batched matrix products per chunk of rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ._edge_kernel import edge_kernel
from ._errors import ShapeMismatchError
from ._mlp_section_passes import MLPPasses
from ._user_hooks import leave_hooked
from .accumulators import Covariance
from .sites import Site

__all__ = ["MLPSection", "activation_derivative", "find_mlp_sections"]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
#: Elements of the per-chunk temporaries of closed-form edges (8 MiB of float64 each).
EDGE_ELEMENTS = 2**20


def _relu(z: torch.Tensor) -> torch.Tensor:
    return (z > 0).to(z.dtype)


def _gelu(z: torch.Tensor) -> torch.Tensor:
    cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return cdf + z * pdf


def _gelu_tanh(z: torch.Tensor) -> torch.Tensor:
    inner = _SQRT_2_OVER_PI * (z + 0.044715 * z**3)
    t = torch.tanh(inner)
    d_inner = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * z * z)
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * d_inner


def _silu(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


_DERIVATIVES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": _relu,
    "gelu": _gelu,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_tanh": _gelu_tanh,
    "silu": _silu,
    "swish": _silu,
    "tanh": lambda z: 1.0 - torch.tanh(z) ** 2,
    "sigmoid": lambda z: torch.sigmoid(z) * (1.0 - torch.sigmoid(z)),
    "identity": torch.ones_like,
    "linear": torch.ones_like,
}


def activation_derivative(
    activation: str | nn.Module | Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The elementwise derivative ``sigma'`` of an activation function.

    Args:
        activation: A name (``"relu"``, ``"gelu"``, ``"gelu_new"``, ``"silu"``, ``"tanh"``,
            ``"sigmoid"``, ``"identity"``), an ``nn.ReLU``/``nn.GELU``/... module, or any
            elementwise callable (differentiated with autograd).

    Returns:
        A function mapping pre-activations ``z`` to ``sigma'(z)`` (same shape).

    Examples:
        >>> import torch
        >>> activation_derivative("relu")(torch.tensor([-1.0, 2.0]))
        tensor([0., 1.])
    """
    if isinstance(activation, str):
        try:
            return _DERIVATIVES[activation.lower()]
        except KeyError:
            raise ValueError(
                f"Unknown activation {activation!r}. Known: {sorted(_DERIVATIVES)}; or pass "
                "the activation function itself."
            ) from None
    if isinstance(activation, nn.ReLU):
        return _relu
    if isinstance(activation, nn.GELU):
        return _gelu_tanh if activation.approximate == "tanh" else _gelu
    if isinstance(activation, nn.SiLU):
        return _silu
    if isinstance(activation, nn.Identity):
        return torch.ones_like
    if isinstance(activation, nn.Tanh):
        return _DERIVATIVES["tanh"]
    if isinstance(activation, nn.Sigmoid):
        return _DERIVATIVES["sigmoid"]
    if not callable(activation):
        raise TypeError(f"activation must be a name or a callable, got {activation!r}.")

    def by_autograd(z: torch.Tensor) -> torch.Tensor:
        # Works inside torch.no_grad()/inference_mode() (collection hooks run there), and the
        # clone keeps in-place activations (LeakyReLU(inplace=True)) off the leaf.
        with torch.inference_mode(False), torch.enable_grad():
            leaf = z.detach().clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(activation(leaf.clone()).sum(), leaf)
        return grad

    return by_autograd


@dataclass
class MLPSection(MLPPasses):
    """A ``Linear -> elementwise activation -> Linear`` section, optionally residual.

    Weights use the ``nn.Linear`` layout: ``w_in`` is ``(d_mlp, d_in)``, ``w_out`` is
    ``(d_out, d_mlp)``. Biases do not enter the Jacobian.

    Attributes:
        w_in: Input weight, shape ``(d_mlp, d_in)``.
        w_out: Output weight, shape ``(d_out, d_mlp)``.
        activation: Name of the activation (see :func:`activation_derivative`).
        residual: ``True`` for ``y = x + MLP(x)`` (needs ``d_out == d_in``).
        pre: Where the pre-activations are read (a site name or :class:`Site`), for the
            section interface (:mod:`degen_hooks.section`; ``build_bases(sections=)`` sets
            it from its ``(section, pre_site)`` pairs); unused by a linear section.

    Examples:
        The closed form equals the Gram of exact backward probes:

        >>> import torch, degen_hooks as dh
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).double()
        >>> x = torch.randn(64, 3, dtype=torch.float64, requires_grad=True)
        >>> sites = [dh.Site("0", io="input"), "0"]  # the section input, the pre-activation
        >>> with dh.collect(
        ...     model, sites, jacobians="exact", target="2", derivatives={"0": "relu"}
        ... ) as run:
        ...     _ = model(x)
        ...     run.backward()
        >>> section = dh.MLPSection.from_modules(model[0], model[1], model[2])
        >>> closed = section.jacobian_gram(run.stats["0"].derivs)
        >>> torch.allclose(closed, run.stats["0:input"].grads.second_moment(), rtol=1e-12)
        True
    """

    w_in: torch.Tensor
    w_out: torch.Tensor
    activation: str = "relu"
    residual: bool = False
    pre: str | Site | None = None

    def __post_init__(self) -> None:
        if self.w_in.shape[0] != self.w_out.shape[1]:
            raise ShapeMismatchError(
                f"w_in {tuple(self.w_in.shape)} and w_out {tuple(self.w_out.shape)} disagree "
                "on d_mlp (w_in is (d_mlp, d_in), w_out is (d_out, d_mlp))."
            )
        if self.residual and self.w_out.shape[0] != self.w_in.shape[1]:
            raise ShapeMismatchError(
                f"A residual section needs d_out == d_in, got {self.w_out.shape[0]} and "
                f"{self.w_in.shape[1]}."
            )

    @classmethod
    def from_modules(
        cls,
        linear_in: nn.Linear,
        activation: str | nn.Module,
        linear_out: nn.Linear,
        *,
        residual: bool = False,
    ) -> MLPSection:
        """Build from two ``nn.Linear`` modules and the activation between them."""
        name = activation if isinstance(activation, str) else _activation_name(activation)
        return cls(linear_in.weight.detach(), linear_out.weight.detach(), name, residual)

    @property
    def d_mlp(self) -> int:
        """Hidden width."""
        return self.w_in.shape[0]

    @property
    def is_linear(self) -> bool:
        """A linear section (identity activation): its Jacobian Gram needs no data at all."""
        return self.activation in ("identity", "linear")

    def jacobian_gram(
        self, derivs: Covariance | None, readout: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``M' = E[J^T R R^T J]`` from the moments of ``sigma'(z)``, shape ``(d_in, d_in)``.

        Args:
            derivs: Streaming moments of ``sigma'(z)`` (width ``d_mlp``), e.g.
                ``run.stats[pre_site].derivs``; ``None`` for a linear section.
            readout: ``(d_out, r)`` read-out of the target; identity when ``None``.

        Returns:
            The Jacobian Gram in float64, averaged over the samples of ``derivs``.
        """
        d_out = self.w_out.shape[0]
        if readout is not None and (readout.ndim != 2 or readout.shape[0] != d_out):
            raise ShapeMismatchError(
                f"Readout of shape {tuple(readout.shape)} cannot read the section output of "
                f"width {d_out}: it must be a (d_out, r) = ({d_out}, r) matrix."
            )
        if self.is_linear:
            return self._linear_gram(readout)
        if derivs is None:
            raise ValueError(
                f"A {self.activation!r} section needs the derivative moments (derivs=); "
                "collect them with dh.collect(..., derivatives={pre_site: activation})."
            )
        if derivs.d != self.d_mlp:
            raise ShapeMismatchError(
                f"Derivative statistics have width {derivs.d}, but the section's hidden "
                f"width is {self.d_mlp}: collect them at this MLP's pre-activation site."
            )
        f64 = torch.float64
        # detach(): weights taken straight from a model must not drag autograd along.
        w_in = self.w_in.detach().to(device=derivs.device, dtype=f64)
        w_out = self.w_out.detach().to(device=derivs.device, dtype=f64)
        q = None if readout is None else readout.detach().to(device=derivs.device, dtype=f64)
        q = torch.eye(w_out.shape[0], dtype=f64, device=w_in.device) if q is None else q @ q.T
        read = w_out.T @ q @ w_out  # (d_mlp, d_mlp)
        gram = w_in.T @ (read * derivs.second_moment()) @ w_in
        if self.residual:
            mean_a = w_out @ (derivs.mean()[:, None] * w_in)  # E[A], (d_in, d_in)
            cross = mean_a.T @ q
            gram = gram + q + cross + cross.T
        # Symmetric by construction; symmetrise the rounding so eigh sees an exact one.
        return (gram + gram.T) / 2

    def _linear_gram(self, readout: torch.Tensor | None) -> torch.Tensor:
        """A constant Jacobian ``J = [I +] W_out W_in``: ``J^T Q J`` without any
        ``d_mlp x d_mlp`` (or identity) product, e.g. an unembedding ``(eye, W_U)``."""
        f64 = torch.float64
        w_in = self.w_in.detach().to(f64)
        w_out = self.w_out.detach().to(device=w_in.device, dtype=f64)
        read = None if readout is None else readout.detach().to(device=w_in.device, dtype=f64)
        m = w_out if read is None else read.T @ w_out  # R^T W_out: (r, d_mlp)
        if not _is_identity(w_in):
            m = m @ w_in  # R^T A, A = W_out W_in: (r, d_in)
        gram = m.T @ m
        if self.residual:
            r_t = torch.eye(m.shape[1], dtype=f64, device=w_in.device) if read is None else read.T
            cross = r_t.T @ m  # Q A
            gram = gram + r_t.T @ r_t + cross + cross.T
        return (gram + gram.T) / 2

    def edge_sums(
        self,
        features: torch.Tensor,
        readin: torch.Tensor | None,
        readout: torch.Tensor | None,
        *,
        inputs: torch.Tensor | None = None,
        pre: torch.Tensor | None = None,
        mean: torch.Tensor | None = None,
        alphas: Sequence[float] = (1.0,),
        weights: Sequence[float] = (1.0,),
        signs: torch.Tensor | None = None,
        elements: int | None = None,
    ) -> torch.Tensor:
        """Un-normalised interaction-graph edges of one batch, from the forward pass alone.

        The section acts position by position, so the derivative of output position ``t``
        depends on input position ``t`` only. In feature coordinates (row convention, input
        ``x = f @ readin + mean``, output features ``y @ readout``) the Jacobian of one row is

            J(x)^T = readin W_in^T diag(sigma'(z(x))) W_out^T readout  (+ readin readout)

        (``r x r_next``; the bracket for a residual section), and the edges are
        ``E_ij = sum_{b,t} (f_tj sum_k w_k J(x_k)_ji)^2`` with ``x_k = alpha_k f @ readin +
        mean`` (lib_math §7.1: input positions summed inside the square, output positions
        outside). ``sum_k w_k J(x_k)`` is linear in ``sigma'``, so integrated gradients
        average ``sigma'(z_k)`` first: one product per row, whatever the number of points.
        ``z_k = pre + (x_k - inputs) W_in^T`` moves the captured pre-activations to the
        rebuilt input. Rows are processed in chunks of ``elements`` (memory ``O(elements +
        r r_next)``, whatever the number of rows).

        Args:
            features: Input features ``f``, shape ``(batch, n_pos, r)``, float64.
            readin: ``C_pinv``, ``(r, d_in)`` (``None``: the features are the raw input).
            readout: ``(d_out, r_next)`` read-out of the output; identity when ``None``.
            inputs: The captured input ``x`` at the same rows, ``(batch, n_pos, d_in)``
                (not needed for a linear section).
            pre: The captured pre-activations ``z``, ``(batch, n_pos, d_mlp)`` (idem).
            mean: The offset the input is rebuilt with (``mu``, not scaled by ``alpha``).
            alphas: Integration points ``alpha_k``.
            weights: Integration weights ``w_k``.
            signs: Random signs ``(n_sources, batch, n_pos, 1)`` combining output positions
                (stochastic edges), or ``None`` for exact edges.
            elements: Most elements of a chunk's temporaries (default ``EDGE_ELEMENTS``).

        Returns:
            ``E``, shape ``(r_next, r)``, float64: the batch's sums (divide by the rows).

        Raises:
            ShapeMismatchError: If ``readin`` or ``readout`` does not fit the section.
            ValueError: For a non-linear section without ``inputs`` and ``pre``.
        """
        f64 = torch.float64
        elements = EDGE_ELEMENTS if elements is None else elements
        device = features.device
        w_in = self.w_in.detach().to(device=device, dtype=f64)
        w_out = self.w_out.detach().to(device=device, dtype=f64)
        d_in, d_out = w_in.shape[1], w_out.shape[0]
        if readin is not None and (readin.ndim != 2 or readin.shape[1] != d_in):
            raise ShapeMismatchError(
                f"Read-in of shape {tuple(readin.shape)} cannot feed the section's input of "
                f"width {d_in}: it must be an (r, d_in) = (r, {d_in}) matrix."
            )
        if readout is not None and (readout.ndim != 2 or readout.shape[0] != d_out):
            raise ShapeMismatchError(
                f"Readout of shape {tuple(readout.shape)} cannot read the section output of "
                f"width {d_out}: it must be a (d_out, r) = ({d_out}, r) matrix."
            )
        readin = None if readin is None else readin.detach().to(device=device, dtype=f64)
        readout = None if readout is None else readout.detach().to(device=device, dtype=f64)
        a_in = w_in.T if readin is None else readin @ w_in.T  # (r, d_mlp)
        b_out = w_out.T if readout is None else w_out.T @ readout  # (d_mlp, r_next)
        w = torch.as_tensor(list(weights), dtype=f64, device=device)
        total = w.sum()  # 1 up to rounding; kept so every term is weighted as autograd's
        skip = None
        if self.residual:
            eye = torch.eye(d_in, dtype=f64, device=device)
            read = eye if readout is None else readout
            skip = total * (read if readin is None else readin @ read)  # (r, r_next)
        r = features.shape[-1]
        if self.is_linear:
            # A constant Jacobian: E_ij = J_ji^2 sum (f_tj or its signed sums over t)^2.
            jac = total * (a_in @ b_out) + (0 if skip is None else skip)
            mixed = (
                features if signs is None else torch.einsum("sbt,btj->sbj", signs[..., 0], features)
            )
            return (jac.square() * mixed.square().sum((0, 1))[:, None]).T
        if inputs is None or pre is None:
            raise ValueError(
                f"A {self.activation!r} section needs the captured inputs and pre-activations "
                "of the batch (inputs=, pre=); only a linear section needs neither."
            )
        derivative = activation_derivative(self.activation)
        shift = 0 if mean is None else mean.to(device=device, dtype=f64)

        def slopes(part: slice) -> tuple[torch.Tensor, None]:
            f = features[part].reshape(-1, r)
            x = inputs[part].reshape(-1, inputs.shape[-1]).to(f64)
            z = pre[part].reshape(-1, self.d_mlp).to(f64)
            slope = torch.zeros_like(z)
            for alpha, weight in zip(alphas, w, strict=True):
                rebuilt = alpha * f if readin is None else (alpha * f) @ readin
                slope += weight * derivative(z + (rebuilt + shift - x) @ w_in.T)
            return slope, None

        return edge_kernel(features, a_in, b_out, slopes, skip, signs, elements).T


def _is_identity(w: torch.Tensor) -> bool:
    if w.shape[0] != w.shape[1]:
        return False
    return torch.equal(w, torch.eye(w.shape[0], dtype=w.dtype, device=w.device))


def _activation_name(module: nn.Module) -> str:
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    if isinstance(module, nn.SiLU):
        return "silu"
    if isinstance(module, nn.Tanh):
        return "tanh"
    if isinstance(module, nn.Sigmoid):
        return "sigmoid"
    if isinstance(module, nn.Identity):
        return "identity"
    raise ValueError(
        f"No closed form known for activation {type(module).__name__}; pass its name "
        "('relu', 'gelu', ...) or use exact probes."
    )


def find_mlp_sections(
    model: nn.Module, sites: list[Site], output: Site | None = None
) -> dict[str, tuple[MLPSection, Site | None]]:
    """Find ``Linear -> activation -> Linear`` sections between consecutive sites.

    Detects them in ``nn.Sequential`` models: a site (the output of a module, or the input of a
    ``Linear``) followed by ``Linear, activation, Linear``, ``Linear, activation`` or a lone
    ``Linear`` whose last output is the next site (or the model output, for the last site
    when ``output`` is ``None``). Missing pieces are identities. A section whose modules carry
    a hook of the user's is left out, with a warning (the closed form cannot see what the hook
    does to the Jacobian; backward passes follow it).

    Args:
        model: The model.
        sites: Ordered node layers.
        output: The final node layer (``None``: the model output).

    Returns:
        ``{site key: (section, pre-activation site)}`` for every detected section.
    """
    if not isinstance(model, nn.Sequential):
        return {}
    names = [name for name, _ in model.named_children()]

    def start_of(site: Site) -> int | None:  # index of the first Linear after the site
        if site.name not in names:
            return None
        index = names.index(site.name)
        return index if site.io == "input" else index + 1

    def end_of(site: Site | None) -> int | None:  # index of the module producing the site
        if site is None:
            return len(names) - 1
        if site.name not in names:
            return None
        return names.index(site.name) - (1 if site.io == "input" else 0)

    found: dict[str, tuple[MLPSection, Site | None]] = {}
    targets = [*sites[1:], output]
    for site, target in zip(sites, targets, strict=True):
        start, end = start_of(site), end_of(target)
        if start is None or end is None or not 0 <= end - start <= 2:
            continue
        modules = [model[i] for i in range(start, end + 1)]
        section = _section_of(modules)
        pair = f"{site.key} -> {'the output' if target is None else target.key}"
        if section is None or leave_hooked(model, pair, names[start : end + 1]):
            continue  # no closed form, or a hook of the user's: backward passes
        pre = None if section.is_linear else Site(names[start], positions=site.positions)
        found[site.key] = (section, pre)
    return found


def _section_of(modules: list[nn.Module]) -> MLPSection | None:
    """``[Linear]``, ``[Linear, act]`` or ``[Linear, act, Linear]`` as a section, else None."""
    if not isinstance(modules[0], nn.Linear):
        return None
    w_in = modules[0].weight.detach()
    if len(modules) == 1:
        return MLPSection(w_in, torch.eye(w_in.shape[0], dtype=w_in.dtype), "identity")
    try:
        name = _activation_name(modules[1])
    except ValueError:
        return None  # an activation without a closed form: use backward passes
    if len(modules) == 2:
        return MLPSection(w_in, torch.eye(w_in.shape[0], dtype=w_in.dtype), name)
    if not isinstance(modules[2], nn.Linear):
        return None
    return MLPSection(w_in, modules[2].weight.detach(), name)
