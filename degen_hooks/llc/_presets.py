"""Presets: the defaults and estimator conventions of degen_hooks or of devinterp.

devinterp (Timaeus; ``devinterp.optim.SGLD``, ``SGMCMC.sgld`` and ``estimate_learning_coeff``)
runs the same update, Δw = (ε/2)·(−nβ·∇L − γ·(w − w*)) + N(0, ε), so its ``lr``,
``localization`` and ``nbeta`` pass through unchanged as ``step_size``, ``gamma`` and
``n_beta``. What differs are the defaults and the loss at w*; see :class:`Preset`.
degen_hooks always samples in eval mode (devinterp in train mode): the same for models
without dropout or batch norm.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from enum import Enum
from typing import Any

from .._checks import closest
from ._data import first_batch_size

__all__ = ["PRESET_DEFAULTS", "Preset", "default_n_beta", "make_preset"]


class Preset(str, Enum):
    """Defaults and conventions of ``estimate_llc``: ``"degen_hooks"`` or ``"devinterp"``.

    What each preset fills in when the setting is not passed (devinterp's name in brackets):

    - step size ε (``lr``): 1e-4; devinterp 0.01, its SGLD default.
    - localisation γ (``localization``): 100; devinterp 0, its SGLD default.
    - inverse temperature nβ (``nbeta``): n/log n, n the number of samples in ``data``;
      devinterp B/log B, B the batch size (``default_nbeta(loader)``).
    - burn-in (``num_burnin_steps``): 50; devinterp 0.
    - loss at w* (``init_loss``): taken on each draw's own batch (a paired difference);
      devinterp: the mean over the first ``n_chains`` batches, for every draw.

    Examples:
        >>> Preset("devinterp") is Preset.DEVINTERP
        True
        >>> PRESET_DEFAULTS[Preset.DEVINTERP]["gamma"]
        0.0
    """

    DEGEN_HOOKS = "degen_hooks"
    DEVINTERP = "devinterp"


PRESET_DEFAULTS: dict[Preset, dict[str, float | int]] = {
    Preset.DEGEN_HOOKS: {"step_size": 1e-4, "gamma": 100.0, "n_burnin": 50},
    Preset.DEVINTERP: {"step_size": 0.01, "gamma": 0.0, "n_burnin": 0},
}
"""The settings a preset fills in when they are not passed."""


def make_preset(preset: str | Preset) -> Preset:
    """Validate ``preset``; an unknown name raises a ValueError with the closest one."""
    names = [p.value for p in Preset]
    if not isinstance(preset, str) or preset not in names:
        suggestion = closest(str(preset), names, n=1)
        hint = f" Did you mean {suggestion[0]!r}?" if suggestion else ""
        raise ValueError(f"Unknown preset {preset!r}; choose one of {names}.{hint}")
    return Preset(preset)


def default_n_beta(preset: Preset, data: Iterable[Any], n_samples: int) -> tuple[float, str]:
    """nβ when none is passed, and how it was chosen.

    Raises:
        ValueError: If the preset's rule needs at least 2 samples and ``data`` holds fewer.
    """
    if preset is Preset.DEVINTERP:
        size = first_batch_size(data)
        # devinterp's default_nbeta falls back to 1 for a batch of one sample.
        return (size / math.log(size) if size > 1 else 1.0), f"B/log(B), B = {size}"
    if n_samples < 2:
        raise ValueError(
            f"The default n_beta = n/log(n) needs n >= 2 samples, but data holds "
            f"{n_samples}. Pass n_beta explicitly."
        )
    return n_samples / math.log(n_samples), "n/log(n)"
