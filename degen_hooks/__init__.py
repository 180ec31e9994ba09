"""degen_hooks: hook-based degeneracy inspection for PyTorch models.

Streams activation and Jacobian statistics out of any ``nn.Module`` (TransformerLens models
included) in float64, and turns them into interaction-basis rotations (Bushnaq et al. 2024,
arXiv 2405.10927 and 2405.10928), synchronized-neuron groups and degeneracy measures.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

# Errors
from ._errors import (
    DegenHooksError,
    DistributedError,
    DivergenceError,
    EmptyStatisticsError,
    FormatError,
    GradientError,
    NonFiniteError,
    NotFittedError,
    SaveError,
    SaveExistsError,
    ShapeMismatchError,
    SiteNotFiredError,
    SiteNotFoundError,
    SiteNotWritableError,
    StatisticsTooLargeError,
    UnsupportedDtypeError,
)

# Node ablation
from .ablation import AblationCurve, ablate, node_ablation_curve

# Statistics
from .accumulators import CoFiring, Covariance, SecondMoment

# Interaction bases
from .basis import InteractionBasis
from .build import build_bases

# Collecting statistics from a model
from .closed_form import MLPSection, activation_derivative
from .collect import Collection, collect
from .normed_section import NormedMLPSection

# Results that last, and across processes
from . import io
from .distributed import all_reduce_
from .io import load, save

# Interaction graphs (the rest is dh.graph.*)
from . import graph
from .graph import InteractionGraph

# Exports other tools open: SAELens folders, attribution-graph JSON
from .export import export_graph, export_saelens

# Degeneracy
from .degeneracy import DegeneracyReport, behavioural_null_dimension, degeneracy_report
from .jacobians import Probe

# Local learning coefficient (samplers, diagnostics, calibration: dh.llc.*)
from . import llc
from .llc import LLCResult, estimate_llc
from .sites import Site, find_sites
from .statistics import SiteStatistics, Statistics
from .synchronized import SynchronizedNeurons, find_synchronized

try:
    __version__ = version("degen-hooks")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    # collecting statistics
    "Collection",
    "MLPSection",
    "NormedMLPSection",
    "Probe",
    "Site",
    "activation_derivative",
    "collect",
    "find_sites",
    # statistics
    "CoFiring",
    "Covariance",
    "SecondMoment",
    "SiteStatistics",
    "Statistics",
    # interaction bases and ablation
    "AblationCurve",
    "InteractionBasis",
    "ablate",
    "build_bases",
    "node_ablation_curve",
    # interaction graphs
    "InteractionGraph",
    "graph",
    # degeneracy
    "DegeneracyReport",
    "SynchronizedNeurons",
    "behavioural_null_dimension",
    "degeneracy_report",
    "find_synchronized",
    # results and processes
    "all_reduce_",
    "export_graph",
    "export_saelens",
    "io",
    "load",
    "save",
    # local learning coefficient
    "LLCResult",
    "estimate_llc",
    "llc",
    # errors
    "DegenHooksError",
    "DistributedError",
    "DivergenceError",
    "EmptyStatisticsError",
    "FormatError",
    "GradientError",
    "NonFiniteError",
    "NotFittedError",
    "SaveError",
    "SaveExistsError",
    "ShapeMismatchError",
    "SiteNotFoundError",
    "StatisticsTooLargeError",
    "SiteNotFiredError",
    "SiteNotWritableError",
    "UnsupportedDtypeError",
]
