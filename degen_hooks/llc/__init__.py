"""Local learning coefficient (LLC) of a trained model, estimated by localised SGLD.

The LLC λ(w*) measures how many parameter directions around the trained parameters w*
actually change the loss (Lau et al. 2023, "Quantifying degeneracy in singular models via
the learning coefficient", arXiv:2308.12108); N_eff = 2λ is the effective parameter count
(a regular model with d parameters has λ = d/2). With the *behavioural* loss, the
divergence between the sampled and the trained model's outputs, it counts the directions
that change the computed function (Bushnaq et al. 2024, "Using degeneracy in the loss
landscape for mechanistic interpretability", arXiv:2405.10927). The estimator is

    λ̂ = nβ · (E_w[L(w)] − L(w*)),   w ~ p(w) ∝ exp(−nβ L(w) − γ/2 |w − w*|²),

with the expectation taken over SGLD draws. The sampler works on a functional copy of the
parameters (``torch.func.functional_call``): the user's model is never modified.

Layout: ``_estimate`` holds :func:`estimate_llc` and its input checks, ``_sampler`` the
private SGLD chain, ``_losses`` the losses and ``_result`` :class:`LLCResult`.
"""

from __future__ import annotations

from ._estimate import estimate_llc
from ._losses import LLCLoss, LossFn, OutputKind
from ._result import LLCResult

__all__ = ["LLCLoss", "LLCResult", "LossFn", "OutputKind", "estimate_llc"]
