"""A potential K(w), a scalar function of parameters, as a module the LLC chains can sample.

``model_and_data`` checks what estimate_llc was given and wraps a potential with a dummy batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._losses import LLCLoss

__all__ = ["PotentialModule", "model_and_data"]


class PotentialModule(nn.Module):
    """Holds w* as parameters; ``forward`` returns K(w) whatever the batch.

    Args:
        potential: ``K(w) -> scalar tensor``, ``w`` a tensor (if ``at`` is one) or a dict
            of tensors (if ``at`` is a dict).
        at: The point w* to sample around: a floating tensor, or a dict of them keyed by
            names without dots.

    Raises:
        TypeError: If ``at`` is not a floating tensor or a dict of them.
        ValueError: If a name of ``at`` is empty or holds a dot.
    """

    def __init__(
        self, potential: Callable[[Any], Tensor], at: Tensor | Mapping[str, Tensor]
    ) -> None:
        super().__init__()
        self.__dict__["potential"] = potential  # a plain attribute, outside the module tree
        self.is_dict = isinstance(at, Mapping)
        tensors = dict(at) if isinstance(at, Mapping) else {"w": at}
        if not tensors:
            raise ValueError("at= is an empty dict; pass the point w* to sample around.")
        for name, value in tensors.items():
            if not isinstance(value, Tensor) or not torch.is_floating_point(value):
                got = value.dtype if isinstance(value, Tensor) else type(value).__name__
                raise TypeError(
                    f"at[{name!r}] must be a floating-point tensor, got {got}. Pass e.g. "
                    "at=torch.zeros(2, dtype=torch.float64)."
                )
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(f"at= names must be non-empty strings without dots, got {name!r}.")
            # Shares w*'s storage; the chains only read it (they sample stacked copies).
            self.register_parameter(name, nn.Parameter(value.detach(), requires_grad=False))
        self.names = list(tensors)

    def forward(self, batch: Any) -> Tensor:
        w = {name: getattr(self, name) for name in self.names}
        value = self.potential(w if self.is_dict else w["w"])
        if not isinstance(value, Tensor) or value.numel() != 1:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"The potential must return a single number (a 0-d tensor), got {got}. "
                "Reduce it, e.g. with .sum()."
            )
        return value.reshape(())


def model_and_data(
    model: Any, data: Any, at: Any, loss: Any, n_beta: float | None
) -> tuple[nn.Module, Iterable[Any], Any]:
    """Wrap a potential as a module with a dummy batch; check model, data and ``at``."""
    if isinstance(model, nn.Module):
        if at is not None:
            raise ValueError(
                "at= is the point to sample a potential around; a model is sampled around "
                "its own parameters. Drop at=, or pass the potential function as model."
            )
        if data is None:
            raise ValueError(
                f"data is needed to estimate the LLC of a {type(model).__name__}: pass a list "
                "of batches or a DataLoader (a potential K(w) needs none)."
            )
        return model, data, loss
    if not callable(model):
        raise TypeError(
            f"model must be an nn.Module or a potential K(w) -> scalar, got {type(model).__name__}."
        )
    if at is None:
        raise ValueError(
            "A potential K(w) needs at=, the point w* to sample around (a tensor, or a dict "
            "of tensors that K takes as its argument)."
        )
    if data is not None:
        raise ValueError(
            "A potential K(w) takes no data; drop data, or wrap the model in an nn.Module "
            "and pass loss=... to sample a loss over data."
        )
    if n_beta is None:
        raise ValueError(
            "A potential has no data to count, so pass n_beta: n_beta = n / math.log(n) "
            "stands for n samples."
        )
    if loss not in ("behavioural", LLCLoss.BEHAVIOURAL, "output", LLCLoss.OUTPUT):
        raise ValueError(f"A potential is its own loss; drop loss= (got {loss!r}).")
    module = PotentialModule(model, at)
    first = next(iter(module.parameters()))
    return module, [torch.zeros(1, dtype=first.dtype, device=first.device)], "output"
