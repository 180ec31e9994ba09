"""The interaction basis: per-site rotations from activation and Jacobian Grams.

Local Interaction Basis (LIB; Bushnaq et al. 2024, arXiv 2405.10928, lib_math §5). For a site
with activations ``f`` (rows, width ``d``), centred Gram ``G = Cov(f)`` and Jacobian Gram
``M' = E[J^T J]`` of the next layer's features with respect to ``f``:

1. ``G = U D U^T``; keep ``D_k > rtol * D_max`` (drops linearly dependent activations);
2. whiten and express ``M'`` there: ``M = D^{1/2} U^T M' U D^{1/2}``;
3. ``M = V Lambda V^T``; keep ``Lambda_k > rtol * Lambda_max`` (drops directions the next
   layer does not read: linearly dependent Jacobians);
4. ``C = U D^{-1/2} V Lambda^{1/2}`` (``d x r``) and ``C_pinv = Lambda^{-1/2} V^T D^{1/2} U^T``.

Conventions: row vectors, ``f_hat = (f - mu) @ C``, ``f ~ f_hat @ C_pinv + mu``. The constant
direction (the mean) is an affine offset that is always kept and never counted as a feature
(rib's constant feature ``f_hat_0 = sqrt(Lambda_0)`` is dropped). The features are then
uncorrelated with variances ``Lambda`` (``C^T G C = diag(Lambda)``) and have unit Jacobian Gram
``C_pinv M' C_pinv^T = I``; Lambda is the nonzero spectrum of ``G M'``.

Baselines: ``variant="pca"`` (centred PCA, unwhitened: ``C = U``, ``Lambda = D``) and
``variant="neuron"`` (``C = I``, neurons ordered by variance).

One meaning of ``lambdas_`` for every variant: the variance of each feature on the fitting data,
``diag(C^T G C)``. For LIB that is the paper's Lambda (the features are whitened against the next
layer, so it is also each feature's importance); for PCA it is the Gram's eigenvalue, for neurons
the neuron's variance (uncentred: the mean square instead of the variance).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._checks import check_fitted
from ._errors import GradientError, ShapeMismatchError, SiteNotFoundError
from ._estimator import ParamsMixin
from .statistics import SiteStatistics, Statistics

__all__ = ["InteractionBasis", "Rotation", "interaction_rotation", "pca_rotation"]

_VARIANTS = ("lib", "pca", "neuron")
_EPS = torch.finfo(torch.float64).eps


@dataclass(frozen=True)
class Rotation:
    """One site's basis.

    Attributes:
        rotation: ``C``, shape ``(d, r)``: features are ``(f - mean) @ C``.
        pinv: ``C_pinv``, shape ``(r, d)``, with ``C_pinv @ C = I_r``.
        lambdas: Importance of each feature, shape ``(r,)``, descending.
        gram_eigenvalues: All eigenvalues of the (centred) Gram, descending, shape ``(d,)``.
        n_gram_kept: How many Gram eigenvalues passed the threshold.
    """

    rotation: torch.Tensor
    pinv: torch.Tensor
    lambdas: torch.Tensor
    gram_eigenvalues: torch.Tensor
    n_gram_kept: int


def default_rtol(d: int) -> float:
    """Relative eigenvalue threshold ``10 * d * eps(float64)`` (lib_math §9, item 5)."""
    return 10.0 * max(d, 1) * _EPS


def _eigh_descending(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of a symmetric matrix in float64, eigenvalues descending."""
    sym = (matrix + matrix.T) / 2
    values, vectors = torch.linalg.eigh(sym.to(torch.float64))
    order = torch.argsort(values, descending=True)
    return values[order], vectors[:, order]


def _n_kept(values: torch.Tensor, rtol: float, atol: float) -> int:
    top = float(values[0]) if values.numel() else 0.0
    if top <= 0:
        return 0
    return int((values > max(rtol * top, atol)).sum())


def pca_rotation(
    gram: torch.Tensor,
    *,
    rtol: float | None = None,
    atol: float = 0.0,
    n_components: int | None = None,
) -> Rotation:
    """Centred PCA basis: eigenvectors of the Gram above the threshold, unwhitened.

    Args:
        gram: Symmetric positive semi-definite matrix, shape ``(d, d)``.
        rtol: Relative threshold on eigenvalues (default :func:`default_rtol`).
        atol: Absolute threshold, applied as well.
        n_components: Keep at most this many.

    Returns:
        A :class:`Rotation` with ``C = U`` and ``Lambda = D``.
    """
    d = gram.shape[0]
    values, vectors = _eigh_descending(gram)
    r = _n_kept(values, default_rtol(d) if rtol is None else rtol, atol)
    r = r if n_components is None else min(r, n_components)
    u = vectors[:, :r]
    return Rotation(u, u.T.clone(), values[:r].clone(), values.clamp_min(0), r)


def interaction_rotation(
    gram: torch.Tensor,
    jacobian_gram: torch.Tensor,
    *,
    rtol: float | None = None,
    atol: float = 0.0,
    n_components: int | None = None,
) -> Rotation:
    """The interaction-basis rotation of one site from its two Gram matrices (float64).

    Args:
        gram: Activation Gram ``G`` (centred covariance, or second moment when uncentred),
            shape ``(d, d)``.
        jacobian_gram: Jacobian Gram ``M'``, shape ``(d, d)``.
        rtol: Relative threshold for both eigendecompositions (default
            :func:`default_rtol`).
        atol: Absolute threshold, applied as well (rib's ``truncation_threshold``).
        n_components: Keep at most this many features (the largest Lambda).

    Returns:
        A :class:`Rotation`; ``lambdas`` are the kept eigenvalues of ``M``.

    Raises:
        ShapeMismatchError: If the two matrices do not have the same square shape.

    Examples:
        >>> import torch
        >>> f = torch.randn(500, 3, dtype=torch.float64)
        >>> w = torch.randn(2, 3, dtype=torch.float64)        # next layer y = f @ w.T
        >>> rot = interaction_rotation(torch.cov(f.T, correction=0), w.T @ w)
        >>> rot.rotation.shape                               # rank of w: 2 features
        torch.Size([3, 2])
    """
    d = gram.shape[0]
    if gram.shape != (d, d) or jacobian_gram.shape != (d, d):
        raise ShapeMismatchError(
            f"Gram {tuple(gram.shape)} and Jacobian Gram {tuple(jacobian_gram.shape)} must "
            "both be (d_site, d_site) for the same site."
        )
    rtol = default_rtol(d) if rtol is None else rtol
    g_values, g_vectors = _eigh_descending(gram)
    r1 = _n_kept(g_values, rtol, atol)
    u, sqrt_d = g_vectors[:, :r1], g_values[:r1].sqrt()
    # M = R+ M' R+^T with R+ = D^{1/2} U^T: the Jacobian Gram in whitened coordinates.
    m_prime = jacobian_gram.to(torch.float64).to(u.device)
    m = (sqrt_d[:, None] * (u.T @ m_prime @ u)) * sqrt_d[None, :]
    lambdas, v = _eigh_descending(m) if r1 else (g_values[:0], u[:0, :0])
    r2 = _n_kept(lambdas, rtol, atol)
    r2 = r2 if n_components is None else min(r2, n_components)
    lambdas, v = lambdas[:r2], v[:, :r2]
    sqrt_l = lambdas.sqrt()
    rotation = (u / sqrt_d[None, :]) @ v * sqrt_l[None, :]
    pinv = (v.T / sqrt_l[:, None]) @ (sqrt_d[:, None] * u.T)
    return Rotation(rotation, pinv, lambdas.clone(), g_values.clamp_min(0), r1)


class InteractionBasis(ParamsMixin):
    """Per-site interaction-basis rotations, fitted from streamed statistics.

    Args:
        variant: ``"lib"`` (interaction basis; needs Jacobian Grams), ``"pca"`` (centred PCA)
            or ``"neuron"`` (identity, neurons ordered by variance).
        center: Subtract the mean (default). ``False`` uses the uncentred second moment and
            no offset (rib's uncentred mode without a bias slot).
        rtol: Relative eigenvalue threshold for both eigendecompositions; default
            ``10 * d * eps``.
        atol: Absolute eigenvalue threshold, applied as well.
        n_components: Keep at most this many features per site.

    Attributes:
        sites_: Site keys in fitting order.
        rotations_: ``{site: C}``, each ``(d_site, r)``.
        pinv_: ``{site: C_pinv}``, each ``(r, d_site)``.
        lambdas_: ``{site: variance of each feature}``, each ``(r,)``, descending: the
            diagonal of ``C^T G C`` on the fitting data, whatever the variant. For ``"lib"``
            this is the paper's Lambda (and each feature's importance: its Jacobian Gram is
            the identity); for ``"pca"`` the Gram's eigenvalues; for ``"neuron"`` the
            neurons' variances. With ``center=False``, mean squares instead of variances.
        gram_eigenvalues_: ``{site: eigenvalues of the Gram}``, each ``(d_site,)``.
        means_: ``{site: mean}`` (zeros when ``center=False``).
        widths_: ``{site: r}``.
        site_info_: ``{site: info}`` (module name, io, positions) from the statistics.

    A site with fewer samples than its width warns: its Gram then has rank at most
    ``n_samples - 1`` (centred), so the width measures the data, not the model.

    Follows scikit-learn's estimator protocol: ``get_params`` / ``set_params``, and
    ``sklearn.base.clone`` gives an unfitted copy with the same hyperparameters.

    Examples:
        >>> import torch, degen_hooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(),
        ...                             torch.nn.Linear(6, 2)).double()
        >>> x = torch.randn(256, 4, dtype=torch.float64)
        >>> with dh.collect(model, ["1"], jacobians="exact") as run:
        ...     run.backward(model(x))
        >>> basis = dh.InteractionBasis().fit(run.stats)
        >>> basis.widths_["1"] <= 2                # the output has 2 dims
        True
        >>> features = basis.transform(torch.relu(model[0](x)), site="1")
        >>> torch.allclose(features.var(0, correction=0), basis.lambdas_["1"])   # variances
        True
    """

    def __init__(
        self,
        *,
        variant: str = "lib",
        center: bool = True,
        rtol: float | None = None,
        atol: float = 0.0,
        n_components: int | None = None,
    ) -> None:
        self.variant = variant
        self.center = center
        self.rtol = rtol
        self.atol = atol
        self.n_components = n_components

    # -- fitting ----------------------------------------------------------------------------
    def fit(
        self, stats: Statistics | Mapping[str, SiteStatistics], sites: Sequence[str] | None = None
    ) -> InteractionBasis:
        """Fit a rotation for every site (or the given ``sites``) of ``stats``.

        Raises:
            ValueError: For an unknown variant.
            GradientError: If ``variant="lib"`` and a site has no Jacobian statistics.
            SiteNotFoundError: If a requested site has no statistics.
        """
        if self.variant not in _VARIANTS:
            raise ValueError(f"variant must be one of {_VARIANTS}, got {self.variant!r}.")
        keys = list(stats) if sites is None else list(sites)
        for attr in ("rotations_", "pinv_", "lambdas_", "gram_eigenvalues_", "means_"):
            setattr(self, attr, {})
        self.widths_, self.site_info_, self.sites_ = {}, {}, []
        for key in keys:
            if key not in stats:
                raise SiteNotFoundError(
                    f"No statistics for site {key!r}; available: {list(stats)}."
                )
            self.fit_site(key, stats[key])
        return self

    def fit_site(self, key: str, site_stats: SiteStatistics) -> InteractionBasis:
        """Fit (or refit) the rotation of one site from its statistics; returns ``self``.

        Raises:
            GradientError: If ``variant="lib"`` and the site has no Jacobian statistics.
        """
        acts = site_stats.acts
        gram = acts.cov() if self.center else acts.second_moment()
        mean = (
            acts.mean()
            if self.center
            else torch.zeros(acts.d, dtype=torch.float64, device=gram.device)
        )
        if self.variant == "lib":
            if site_stats.grads is None or site_stats.grads.n_samples == 0:
                raise GradientError(
                    f"The interaction basis of site {key!r} needs its Jacobian Gram, but the "
                    "statistics hold none. Collect with dh.collect(..., jacobians='exact') and "
                    "call run.backward(...), use dh.build_bases(...), or fit "
                    "InteractionBasis(variant='pca') instead."
                )
            rot = interaction_rotation(
                gram,
                site_stats.grads.second_moment().to(gram.device),
                rtol=self.rtol,
                atol=self.atol,
                n_components=self.n_components,
            )
        elif self.variant == "pca":
            rot = pca_rotation(gram, rtol=self.rtol, atol=self.atol, n_components=self.n_components)
        else:
            rot = _neuron_rotation(gram, self.n_components)
        if self.variant != "neuron":
            rank = _n_kept(
                rot.gram_eigenvalues,
                default_rtol(acts.d) if self.rtol is None else self.rtol,
                self.atol,
            )
            _warn_if_data_limited(key, acts.n_samples, acts.d, rank, center=self.center)
        return self.add_rotation(key, rot, mean, info=site_stats.info)

    def add_rotation(
        self,
        key: str,
        rotation: Rotation,
        mean: torch.Tensor,
        *,
        info: Mapping[str, Any] | None = None,
    ) -> InteractionBasis:
        """Store an already computed rotation for ``key`` (used by the builders)."""
        if not hasattr(self, "sites_"):
            self.rotations_, self.pinv_, self.lambdas_ = {}, {}, {}
            self.gram_eigenvalues_, self.means_, self.widths_ = {}, {}, {}
            self.site_info_, self.sites_ = {}, []
        self.rotations_[key] = rotation.rotation
        self.pinv_[key] = rotation.pinv
        self.lambdas_[key] = rotation.lambdas
        self.gram_eigenvalues_[key] = rotation.gram_eigenvalues
        self.means_[key] = mean.to(torch.float64)
        self.widths_[key] = rotation.rotation.shape[1]
        self.site_info_[key] = dict(info or {"name": key, "io": "output", "positions": None})
        if key not in self.sites_:
            self.sites_.append(key)
        return self

    # -- using it ---------------------------------------------------------------------------
    def _get(self, site: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_fitted(self, ["rotations_"])
        if site not in self.rotations_:
            raise SiteNotFoundError(
                f"This basis has no rotation for site {site!r}; it has {self.sites_}."
            )
        return self.rotations_[site], self.pinv_[site], self.means_[site]

    def transform(self, acts: torch.Tensor, site: str) -> torch.Tensor:
        """Features ``(acts - mean) @ C``, shape ``(..., r)`` for ``acts`` of shape ``(..., d)``.

        Raises:
            NotFittedError: Before :meth:`fit`.
            ShapeMismatchError: If ``acts`` has another width than the site.
        """
        rotation, _, mean = self._get(site)
        if acts.shape[-1] != rotation.shape[0]:
            raise ShapeMismatchError(
                f"Basis for site {site!r} has d_site={rotation.shape[0]}, but the activations "
                f"have width {acts.shape[-1]} (shape {tuple(acts.shape)}). Apply it to "
                "activations of the site it was fitted on."
            )
        x = acts.to(torch.float64) - mean.to(acts.device)
        return x @ rotation.to(acts.device)

    def inverse_transform(self, features: torch.Tensor, site: str) -> torch.Tensor:
        """Activations ``features @ C_pinv + mean``, shape ``(..., d)`` (exact on the data span).

        Raises:
            ShapeMismatchError: If ``features`` does not have ``r`` columns.
        """
        _, pinv, mean = self._get(site)
        if features.shape[-1] != pinv.shape[0]:
            raise ShapeMismatchError(
                f"Basis for site {site!r} has {pinv.shape[0]} features, but got "
                f"{features.shape[-1]} (shape {tuple(features.shape)})."
            )
        dev = features.device
        return features.to(torch.float64) @ pinv.to(dev) + mean.to(dev)

    def projector(self, site: str, keep: Sequence[int] | int | None = None) -> torch.Tensor:
        """Oblique projector ``C[:, keep] @ C_pinv[keep, :]``, shape ``(d, d)``.

        Args:
            site: Site key.
            keep: Feature indices to keep, or an int ``k`` for the top ``k``; all when ``None``.
        """
        rotation, pinv, _ = self._get(site)
        index = _keep_index(keep, rotation.shape[1])
        return rotation[:, index] @ pinv[index, :]

    def __repr__(self) -> str:
        params = f"variant={self.variant!r}, center={self.center}"
        if not hasattr(self, "widths_"):
            return f"InteractionBasis({params})"
        widths = ", ".join(f"{k}: {v}" for k, v in self.widths_.items())
        return f"InteractionBasis({params}; widths {{{widths}}})"

    # -- persistence ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors ``"<site>/<field>"`` (for safetensors)."""
        check_fitted(self, ["rotations_"])
        state = {}
        for key in self.sites_:
            for name, table in (
                ("rotation", self.rotations_),
                ("pinv", self.pinv_),
                ("lambdas", self.lambdas_),
                ("gram_eigenvalues", self.gram_eigenvalues_),
                ("mean", self.means_),
            ):
                state[f"{key}/{name}"] = table[key].detach().cpu().contiguous()
        return state

    def metadata(self) -> dict[str, Any]:
        """JSON-able hyperparameters, sites, widths and site descriptions."""
        check_fitted(self, ["rotations_"])
        return {
            "params": self.get_params(deep=False),
            "sites": list(self.sites_),
            "widths": dict(self.widths_),
            "site_info": dict(self.site_info_),
        }

    @classmethod
    def from_state(
        cls, state: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
    ) -> InteractionBasis:
        """Rebuild from :meth:`state_dict` and :meth:`metadata`."""
        basis = cls(**metadata["params"])
        for key in metadata["sites"]:
            rot = Rotation(
                state[f"{key}/rotation"],
                state[f"{key}/pinv"],
                state[f"{key}/lambdas"],
                state[f"{key}/gram_eigenvalues"],
                0,
            )
            basis.add_rotation(key, rot, state[f"{key}/mean"], info=metadata["site_info"][key])
        return basis


def _warn_if_data_limited(
    key: str, n_samples: int, d_site: int, rank: int, *, center: bool
) -> None:
    """Warn when the Gram's rank reached the bound the sample count puts on it.

    ``n`` samples span at most ``n - 1`` centred directions (``n`` uncentred): below the
    site's width, a rank at that bound says how many samples there were, not how many
    directions the model uses (512 tokens at ``d_site = 3072`` give width 511).
    """
    bound = n_samples - 1 if center else n_samples
    if bound >= d_site or rank < bound:
        return
    warnings.warn(
        f"Site {key!r} has {n_samples} samples for d_site={d_site}: its "
        f"{'covariance' if center else 'second moment'} has rank at most {bound}, and it "
        f"reached it, so the site's width is set by the number of samples, not by the model. "
        "Collect more than d_site samples (each token position counts as one) before reading "
        "the width as the model's.",
        UserWarning,
        stacklevel=_outside_package(),
    )


def _outside_package() -> int:
    """The ``stacklevel`` of the first caller outside degen_hooks (fit, fit_site, build_bases)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1  # level 1: the function that calls warnings.warn
    while frame is not None and frame.f_code.co_filename.startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def _neuron_rotation(gram: torch.Tensor, n_components: int | None) -> Rotation:
    d = gram.shape[0]
    variances = torch.diagonal(gram).clone()
    order = torch.argsort(variances, descending=True)
    r = d if n_components is None else min(d, n_components)
    eye = torch.eye(d, dtype=torch.float64, device=gram.device)[:, order[:r]]
    g_values = torch.linalg.eigvalsh((gram + gram.T) / 2).flip(0).clamp_min(0)
    return Rotation(eye, eye.T.clone(), variances[order[:r]], g_values, d)


def _keep_index(keep: Sequence[int] | int | None, r: int) -> torch.Tensor:
    if keep is None:
        return torch.arange(r)
    if isinstance(keep, int):
        if not 0 <= keep <= r:
            raise ValueError(f"keep={keep} is outside 0..{r} (the site has {r} features).")
        return torch.arange(keep)
    index = torch.as_tensor(list(keep), dtype=torch.long)
    if index.numel() and (index.min() < 0 or index.max() >= r):
        raise ValueError(f"Feature indices {index.tolist()} outside 0..{r - 1}.")
    return index
