"""scikit-learn's estimator protocol for the library's estimators: ``get_params`` / ``set_params``.

Every estimator (:class:`~degen_hooks.InteractionBasis`,
:class:`~degen_hooks.SynchronizedNeurons`, :class:`~degen_hooks.InteractionGraph`) stores its
keyword hyperparameters unchanged in ``__init__``, under the same names. :class:`ParamsMixin`
reads those names from the ``__init__`` signature, as ``sklearn.base.BaseEstimator`` does, so
``sklearn.base.clone`` builds an unfitted copy with the same hyperparameters, grid-search
style code can ``set_params``, and ``sklearn.utils.validation.check_is_fitted`` works (fitted
attributes end in ``_``; :meth:`ParamsMixin.__sklearn_tags__` gives its tags).

The mixin does not inherit ``BaseEstimator`` itself: that would bring scikit-learn's notebook
diagram (``_repr_mimebundle_``), which would replace the estimators' own HTML tables, and its
pickling hooks, for nothing the protocol needs.
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["ParamsMixin"]


class ParamsMixin:
    """``get_params`` and ``set_params`` from the ``__init__`` signature (scikit-learn's protocol).

    Examples:
        >>> class Smoother(ParamsMixin):
        ...     def __init__(self, *, width: int = 3, center: bool = True) -> None:
        ...         self.width = width
        ...         self.center = center
        >>> Smoother(width=5).get_params()
        {'width': 5, 'center': True}
        >>> Smoother().set_params(center=False).center
        False
    """

    @classmethod
    def _param_names(cls) -> list[str]:
        """The keyword hyperparameters of ``__init__``, in signature order."""
        signature = inspect.signature(cls.__init__)
        skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        return [
            p.name for p in signature.parameters.values() if p.name != "self" and p.kind not in skip
        ]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The hyperparameters, as passed to ``__init__``.

        Args:
            deep: Also list the parameters of hyperparameters that are estimators themselves,
                as ``"<name>__<parameter>"`` (scikit-learn's convention; none here today).

        Returns:
            ``{name: value}`` for every ``__init__`` argument.
        """
        params: dict[str, Any] = {}
        for name in self._param_names():
            value = getattr(self, name)
            if deep and hasattr(value, "get_params") and not isinstance(value, type):
                params.update((f"{name}__{k}", v) for k, v in value.get_params().items())
            params[name] = value
        return params

    def set_params(self, **params: Any) -> Any:
        """Set hyperparameters by name; refit to apply them.

        Args:
            **params: New values, by ``__init__`` argument name (``"<name>__<parameter>"``
                for a parameter of a nested estimator).

        Returns:
            ``self``.

        Raises:
            ValueError: If a name is not a hyperparameter of this estimator.
        """
        valid = self.get_params(deep=False)
        unknown = sorted({key.partition("__")[0] for key in params} - set(valid))
        if unknown:
            raise ValueError(
                f"Unknown parameter(s) {unknown} for {type(self).__name__}; valid: "
                f"{sorted(valid)}. Pass them as set_params(name=value)."
            )
        nested: dict[str, dict[str, Any]] = {}
        for key, value in params.items():
            name, nested_key, sub = key.partition("__")
            if nested_key:
                nested.setdefault(name, {})[sub] = value
            else:
                setattr(self, name, value)
        for name, sub_params in nested.items():
            getattr(self, name).set_params(**sub_params)
        return self

    def __sklearn_tags__(self) -> Any:
        """scikit-learn's estimator tags (read by its ``check_is_fitted`` from version 1.6).

        Returns:
            ``sklearn.utils.Tags`` of an estimator that must be fitted and takes no target:
            those of ``BaseEstimator``.
        """
        from sklearn.utils import Tags, TargetTags  # scikit-learn >= 1.6 asks for these

        return Tags(estimator_type=None, target_tags=TargetTags(required=False))
