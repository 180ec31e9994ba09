"""Local learning coefficient (LLC) of a trained model, estimated by localised SGLD.

The LLC λ(w*) measures how many parameter directions around the trained parameters w*
actually change the loss (Lau et al. 2023, "Quantifying degeneracy in singular models via
the learning coefficient", arXiv:2308.12108); N_eff = 2λ is the effective parameter count
(a regular model with d parameters has λ = d/2). With the *behavioural* loss, the
divergence between the sampled and the trained model's outputs, it counts the directions
that change the computed function (Bushnaq et al. 2024, "Using degeneracy in the loss
landscape for mechanistic interpretability", arXiv:2405.10927). The estimator is

    λ̂ = nβ · (E_w[L(w)] − L(w*)),   w ~ p(w) ∝ exp(−nβ L(w) − γ/2 |w − w*|²),

with the expectation taken over the draws of a sampler: SGLD, or SGLD preconditioned by
RMSProp. All chains advance together on stacked copies of the parameters
(``torch.func.functional_call`` + ``vmap``): the user's model is never modified. Every
result carries diagnostics (a step too small to move, chains that disagree, few effective
draws, a drifting trace, a negative estimate) and a trace plot that shows them.

Layout: ``_estimate`` holds :func:`estimate_llc`, ``_checks`` its input checks,
``_chains`` the stacked chains, ``_samplers`` the update rules, ``_diagnostics`` the
checks of the traces, ``_presets`` the degen_hooks and devinterp conventions,
``_potential`` potentials K(w) without a model, ``_losses`` the losses, ``_result``
:class:`LLCResult` (``_plot`` its trace plot) and ``_calibration`` potentials with known
learning coefficients (``python -m benchmarks --only llc_calibration``).
"""

from __future__ import annotations

from ._calibration import (
    CalibrationCase,
    calibration_cases,
    exact_llc,
    exact_monomial_llc,
    exact_normal_crossing_llc,
)
from ._diagnostics import (
    Diagnostic,
    DiagnosticKind,
    effective_sample_size,
    potential_scale_reduction,
)
from ._estimate import estimate_llc
from ._losses import LLCLoss, LossFn, OutputKind
from ._presets import Preset
from ._result import LLCResult
from ._samplers import SGLD, RMSPropSGLD, SamplerKind

__all__ = [
    "SGLD",
    "CalibrationCase",
    "Diagnostic",
    "DiagnosticKind",
    "LLCLoss",
    "LLCResult",
    "LossFn",
    "OutputKind",
    "Preset",
    "RMSPropSGLD",
    "SamplerKind",
    "calibration_cases",
    "effective_sample_size",
    "estimate_llc",
    "exact_llc",
    "exact_monomial_llc",
    "exact_normal_crossing_llc",
    "potential_scale_reduction",
]
