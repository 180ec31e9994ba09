"""The interaction basis of the shipped modular-addition transformers (lib_math §8.2, T16).

Reproduces the published LIB analysis of the one-layer modular-addition models: node layers
are the residual stream entering block 0 (all three positions), the residual after attention
(last position) and after the MLP (last position); the final layer is the output logits at
the last position, unrotated; centred; local (Jacobian) basis; fitted on the training split;
centred PCA as the baseline. It reports widths, Lambda spectra, node-ablation curves on the
test split, the MLP's synchronized neurons, and the dominant Fourier frequencies of the
features over the 113 x 113 input grid.

TransformerLens is imported when a model is loaded (through :mod:`degen_hooks.zoo`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._read_pass import SiteReader
from .ablation import AblationCurve, node_ablation_curve
from .basis import InteractionBasis
from .build import build_bases
from .collect import collect
from .sites import Site
from .statistics import Statistics
from .synchronized import SynchronizedNeurons
from .zoo import ModAddData, load_modadd, load_modadd_data

__all__ = [
    "ModAddAnalysis",
    "analyse_modadd",
    "build_modadd_bases",
    "fourier_summary",
    "modadd_sites",
]

RESID_PRE = "blocks.0.hook_resid_pre"
RESID_MID = "blocks.0.hook_resid_mid"
RESID_POST = "blocks.0.hook_resid_post"
MLP_PRE = "blocks.0.mlp.hook_pre"
DEFAULT_N_KEPT = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24, 32, 48, 64, 96, 128)
QUICK_N_KEPT = (0, 2, 4, 8, 16, 32, 64, 128)
TOLERANCE = 0.001  # the papers' criterion: test accuracy within 0.1 % of the model's


def modadd_sites() -> list[Site]:
    """The three node layers of the published analysis, earliest first."""
    return [Site(RESID_PRE), Site(RESID_MID, positions="last"), Site(RESID_POST, positions="last")]


@dataclass
class ModAddAnalysis:
    """Everything :func:`analyse_modadd` measured on one seed.

    Attributes:
        seed: Training seed of the model.
        lib: The local interaction basis (``lib.stats_`` holds the statistics).
        pca: The centred PCA baseline fitted on the same statistics.
        synchronized: Synchronized groups of the MLP neurons (last position, training set).
        firing: The co-firing statistics behind ``synchronized``.
        curves: Node-ablation curves (test accuracy vs features kept), by site.
        fourier: Dominant frequencies of the features, by site (see :func:`fourier_summary`).
        accuracy: Test accuracy of the unablated model.
        timings: Seconds per stage.
        model: The analysed model (float32 after the build when loaded here, as shipped).
    """

    seed: int
    lib: InteractionBasis
    pca: InteractionBasis
    synchronized: SynchronizedNeurons
    firing: Statistics
    curves: dict[str, AblationCurve] = field(default_factory=dict)
    fourier: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    accuracy: float = float("nan")
    timings: dict[str, float] = field(default_factory=dict)
    model: nn.Module | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-able numbers: widths, spectra, features needed, groups, frequencies."""
        return {
            "seed": self.seed,
            "test_accuracy": self.accuracy,
            "widths": {"LIB": dict(self.lib.widths_), "PCA": dict(self.pca.widths_)},
            "lambdas": {k: v.tolist() for k, v in self.lib.lambdas_.items()},
            "pca_variances": {k: v.tolist() for k, v in self.pca.lambdas_.items()},
            "features_needed": {
                site: curve.min_features(TOLERANCE) for site, curve in self.curves.items()
            },
            "synchronized_groups": [sorted(g) for g in self.synchronized.groups_],
            "dead_neurons": sorted(int(i) for i in self.synchronized.dead_),
            "fourier": self.fourier,
            "timings": self.timings,
        }


def build_modadd_bases(
    model: nn.Module, tokens: torch.Tensor, *, batch_size: int = 1024, progress: bool = True
) -> InteractionBasis:
    """The local interaction basis of the three node layers, fitted on ``tokens``.

    Every section has a closed form (found by ``sections="auto"``, see
    :func:`degen_hooks.transformer_lens.find_sections`): the attention section (residual
    entering block 0 -> after attention) is read from one forward pass of the layer's q, k,
    v and pattern, the MLP section (-> after the MLP) from the derivative moments, and the
    unembedding (-> logits, linear) needs no data. No backward pass runs.
    """
    return build_bases(
        model,
        modadd_sites(),
        tokens.split(batch_size),
        output_positions="last",
        progress=progress,
    )


def _accuracy(output: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return (output[:, -1].argmax(-1) == batch[1]).double()


def fourier_summary(
    features: torch.Tensor, p: int = 113, *, n_features: int = 10
) -> list[dict[str, Any]]:
    """Dominant 2-D Fourier frequency of each feature over the ``p x p`` input grid.

    Args:
        features: Feature values on every input ``i = a * p + b``, shape ``(p * p, r)``.
        p: The modulus.
        n_features: How many leading features to describe.

    Returns:
        One dict per feature: ``frequency`` ``(f_a, f_b)`` folded to ``0..p//2``, and
        ``power_fraction``, the share of the feature's non-constant power at that frequency
        and its mirror images.
    """
    grid = features[:, :n_features].T.reshape(-1, p, p).to(torch.float64)
    power = torch.fft.fft2(grid).abs() ** 2
    power[:, 0, 0] = 0.0  # the mean is not a frequency
    out = []
    for k in range(grid.shape[0]):
        total = float(power[k].sum())
        flat = int(power[k].argmax())
        fa, fb = divmod(flat, p)
        fold = (min(fa, p - fa), min(fb, p - fb))
        mirrors = {(fa, fb), ((p - fa) % p, (p - fb) % p), (fa, (p - fb) % p), ((p - fa) % p, fb)}
        share = sum(float(power[k, i, j]) for i, j in mirrors) / total if total > 0 else 0.0
        out.append({"feature": k, "frequency": list(fold), "power_fraction": share})
    return out


def _site_acts(model: nn.Module, site: Site, tokens: torch.Tensor) -> torch.Tensor:
    return _sites_acts(model, [site], tokens)[site.key]


def _sites_acts(
    model: nn.Module, sites: list[Site], tokens: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The activations of several sites on ``tokens``, read in one pass over them."""
    acts: dict[str, list[torch.Tensor]] = {site.key: [] for site in sites}
    reader = SiteReader(model, {site.key: site for site in sites}, what="analyse_modadd")
    for batch in tokens.split(4096):
        captured, _, _ = reader(batch)  # stops after the last site
        for key, act in captured.items():
            acts[key].append(act)
    out = {}
    for site in sites:
        act = torch.cat(acts[site.key])
        out[site.key] = act[:, -1] if site.positions == "last" else act
    return out


def analyse_modadd(
    seed: int = 0,
    *,
    model: nn.Module | None = None,
    data: ModAddData | None = None,
    batch_size: int = 1024,
    n_kept: tuple[int, ...] = QUICK_N_KEPT,
    ablation_sites: tuple[str, ...] = (RESID_MID, RESID_POST),
    progress: bool = True,
) -> ModAddAnalysis:
    """Build LIB and PCA on a shipped modular-addition model and measure them.

    Args:
        seed: Which shipped model (0..4), loaded in float64 unless ``model`` is given.
        model: A model to analyse instead (same architecture).
        data: Its data (default: the shipped split).
        batch_size: Examples per forward pass.
        n_kept: Numbers of features for the node-ablation curves.
        ablation_sites: Sites whose node-ablation curves are measured.
        progress: Show progress bars.

    Returns:
        A :class:`ModAddAnalysis`.
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    owned = model is None
    if model is None:
        model, data = load_modadd(seed, dtype=torch.float64)
    data = data if data is not None else load_modadd_data()
    train = data.train_tokens.split(batch_size)
    lib = build_modadd_bases(model, data.train_tokens, batch_size=batch_size, progress=progress)
    timings.update({f"build: {k}": v for k, v in lib.timings_.items()})
    keys = list(lib.sites_)
    pca = InteractionBasis(variant="pca").fit(lib.stats_, keys)

    mark = time.perf_counter()
    with collect(model, [Site(MLP_PRE, positions="last")], firing=True) as run:
        run.over(train, progress=progress, desc="firing")
    synchronized = SynchronizedNeurons().fit(run.stats, site=MLP_PRE)
    timings["synchronized neurons"] = time.perf_counter() - mark
    if owned:
        # The bases are fitted; the shipped float32 weights evaluate ablations at half the
        # cost with the same accuracies (the projection itself runs in float64).
        model, _ = load_modadd(seed)

    mark = time.perf_counter()
    test = list(zip(data.test_tokens.split(4096), data.test_labels.split(4096), strict=True))
    curves = {
        site: node_ablation_curve(
            model,
            {"LIB": lib, "PCA": pca},
            site,
            test,
            metric=_accuracy,
            n_kept=n_kept,
            forward=lambda m, batch: m(batch[0]),
            progress=progress,
        )
        for site in ablation_sites
    }
    timings["node ablation"] = time.perf_counter() - mark

    mark = time.perf_counter()
    grid = load_modadd_data_grid(data.p)
    fourier = {}
    for key, acts in _sites_acts(model, modadd_sites()[1:], grid).items():
        fourier[key] = fourier_summary(lib.transform(acts, key), data.p)
    timings["fourier"] = time.perf_counter() - mark
    timings["total"] = time.perf_counter() - started
    accuracy = next(iter(curves.values())).baseline if curves else float("nan")
    return ModAddAnalysis(
        seed, lib, pca, synchronized, run.stats, curves, fourier, accuracy, timings, model
    )


def load_modadd_data_grid(p: int = 113) -> torch.Tensor:
    """All ``p * p`` inputs ``[a, b, p]`` in the order ``i = a * p + b``, shape ``(p*p, 3)``."""
    index = torch.arange(p * p)
    return torch.stack([index // p, index % p, torch.full_like(index, p)], dim=1)
