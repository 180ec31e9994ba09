"""Sites: where in a model activations are read.

A site is a module's output (or input) addressed by its dotted ``named_modules()`` path,
e.g. ``"layers.1"`` or, on a TransformerLens model, ``"blocks.0.mlp.hook_post"`` (HookPoints
are modules, so no special case is needed). A site may name one element of a structured
output, one argument of the input, one call of a module called several times, and the axis
holding its features; it may keep only some token positions. All other dimensions (batch,
positions, ...) are flattened into samples; the feature axis is the site's width ``d_site``.
Reading and writing a site go through one mechanism, :class:`degen_hooks._hooks.SiteHook`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._checks import closest
from ._errors import ShapeMismatchError, SiteNotFoundError, UnsupportedDtypeError
from ._family import family_hook
from ._positions import Positions, describe_positions, position_cells, select_positions

__all__ = [
    "Positions",
    "Site",
    "find_sites",
    "position_cells",
    "resolve_bypass",
    "resolve_sites",
    "select_positions",
]

_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Site:
    """One place to read (and write) activations.

    Args:
        name: Dotted module path from ``model.named_modules()``.
        io: ``"output"`` (default) reads what the module returns; ``"input"`` reads one of
            its arguments.
        positions: Token positions to keep from activations shaped
            ``(batch, pos, ..., d)``: ``None`` (all), ``"last"``, an ``int``, a ``slice``, a
            sequence of ints, or a boolean tensor of shape ``(pos,)``. A per-batch boolean
            mask (padding) is set with ``run.set_mask(mask)`` instead; with a mask,
            ``"last"`` means each row's last unmasked position.
        label: Key of the site's statistics; defaults to ``name`` (``name + ":input"`` for
            inputs).
        arg: With ``io="input"``: the argument to read, a keyword name (``"hidden_states"``,
            found whether it is passed by keyword or by position) or a position. Default:
            the first positional tensor, else the only tensor passed by keyword.
        element: With ``io="output"``: the element of a tuple, list (an index), dict or
            Hugging Face ``ModelOutput`` (a key) to read. Default: the tensor itself, the
            first tensor of a tuple or list, or ``logits``.
        call: For a module called several times in one forward pass: ``None`` (default)
            reads every call and warns, ``"all"`` reads every call silently, an ``int``
            reads only that call (0 is the first).
        feature_axis: The axis holding the features, e.g. ``1`` for a conv feature map
            ``(N, C, H, W)``; the others become samples, and ``positions`` index axis 1 once
            the feature axis is moved last. Default: the last axis (an activation with 4 or
            more dimensions warns).
        bypass: A module name whose output this site's tensor also reaches through a
            residual skip connection (``"blocks.0.hook_out"``). Reads ignore it; a write at
            the site (``ablate``, graph edges) adds its change to that output as well, so it
            reaches every consumer. Set for you on a TransformerLens bridge's
            ``hook_resid_mid``, which is the input of ``ln2``.

    Examples:
        >>> Site("blocks.0.hook_resid_mid", positions="last").key
        'blocks.0.hook_resid_mid'
        >>> Site("layers.1", io="input").key
        'layers.1:input'
        >>> Site("features.0", feature_axis=1).rows(torch.zeros(2, 3, 4, 5)).shape
        torch.Size([40, 3])
    """

    name: str
    io: str = "output"
    positions: Positions = field(default=None, compare=False)
    label: str | None = None
    arg: int | str | None = field(default=None, kw_only=True)
    element: int | str | None = field(default=None, kw_only=True)
    call: int | str | None = field(default=None, kw_only=True)
    feature_axis: int | None = field(default=None, kw_only=True)
    bypass: str | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        if self.io not in ("output", "input"):
            raise ValueError(f"Site.io must be 'output' or 'input', got {self.io!r}.")
        if isinstance(self.positions, str) and self.positions != "last":
            raise ValueError(
                f"Site.positions must be None, 'last', an int, a slice, a sequence of ints "
                f"or a boolean tensor, got {self.positions!r}."
            )
        positions = self.positions
        empty = isinstance(positions, (list, tuple)) and len(positions) == 0
        if isinstance(positions, torch.Tensor) and positions.dtype != torch.bool:
            empty = positions.numel() == 0
        if empty:
            raise ValueError(
                f"Site {self.name!r}: positions={positions!r} keeps no position, so the site "
                "has no samples. Use positions=None for every position, 'last', or a "
                "non-empty list of positions."
            )
        if self.arg is not None and self.io != "input":
            raise ValueError(
                f"Site.arg={self.arg!r} names an input argument: use it with io='input' (for "
                "an element of the output, use element=)."
            )
        if self.element is not None and self.io != "output":
            raise ValueError(
                f"Site.element={self.element!r} names an element of the output: use it with "
                "io='output' (for an input argument, use arg=)."
            )
        call = self.call
        if not (call is None or call == "all" or (isinstance(call, int) and call >= 0)):
            raise ValueError(f"Site.call must be None, 'all' or a call index >= 0, got {call!r}.")
        if self.feature_axis is not None and not isinstance(self.feature_axis, int):
            raise ValueError(f"Site.feature_axis must be an int, got {self.feature_axis!r}.")

    @property
    def key(self) -> str:
        """The name the statistics of this site are stored under."""
        if self.label is not None:
            return self.label
        name = self.name or "output"  # the root module: the model's own output
        return name if self.io == "output" else f"{name}:input"

    def to_info(self) -> dict[str, Any]:
        """A JSON-able description (name, io, positions, label, ...); see :meth:`from_info`."""
        positions = describe_positions(self.positions)
        info = {"name": self.name, "io": self.io, "positions": positions, "label": self.label}
        # Only what differs from the defaults: older saves read the same.
        info.update({k: getattr(self, k) for k in _OPTIONAL if getattr(self, k) is not None})
        return info

    @classmethod
    def from_info(cls, info: dict[str, Any], key: str | None = None) -> Site:
        """Rebuild a site from :meth:`to_info` (``key`` becomes its label)."""
        positions = info.get("positions")
        if isinstance(positions, str) and positions.startswith("slice("):
            parts = [None if p.strip() == "None" else int(p) for p in positions[6:-1].split(",")]
            positions = slice(*parts)
        return cls(
            info.get("name", key or ""),
            io=info.get("io", "output"),
            positions=positions,
            label=key if key is not None else info.get("label"),
            **{k: info[k] for k in _OPTIONAL if info.get(k) is not None},
        )

    def features_last(self, act: torch.Tensor) -> torch.Tensor:
        """``act`` with the feature axis moved last (a view; ``act`` if it is last already).

        Raises:
            UnsupportedDtypeError: For complex or integer activations.
            ShapeMismatchError: If the feature axis does not exist.
        """
        if act.is_complex() or not act.is_floating_point():
            raise UnsupportedDtypeError(
                f"Site {self.key!r} produced a {act.dtype} tensor of shape "
                f"{tuple(act.shape)}. Statistics are real float64 moments: "
                + (
                    "the imaginary part would be dropped. Read the real and imaginary parts "
                    "as features: add a module computing torch.view_as_real(x).flatten(-2), "
                    "or read a real-valued site."
                    if act.is_complex()
                    else "integers (token ids, indices) are not features. Read the module "
                    "that turns them into vectors, e.g. the embedding's output."
                )
            )
        if self.feature_axis is None or act.ndim == 0:
            return act
        if not -act.ndim <= self.feature_axis < act.ndim:
            raise ShapeMismatchError(
                f"Site {self.key!r} has feature_axis={self.feature_axis}, but its activation "
                f"has shape {tuple(act.shape)} ({act.ndim} axes)."
            )
        return act.movedim(self.feature_axis, -1)

    def restore_axis(self, x: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`features_last`: the feature axis goes back to its place."""
        return x if self.feature_axis is None else x.movedim(-1, self.feature_axis)

    def rows(self, act: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Select positions and flatten ``act`` to rows, shape ``(n_samples, d_site)``.

        Args:
            act: Activation of shape ``(batch, d)`` or ``(batch, pos, ..., d)`` (features on
                ``feature_axis``).
            mask: Optional boolean ``(batch, pos)`` mask; ``False`` positions are dropped.

        Returns:
            The rows, shape ``(n_samples, d_site)``; ``n_samples`` may be 0 (an empty batch,
            a mask of padding only).

        Raises:
            ShapeMismatchError: For a 0-d ``act`` (a scalar such as a loss), or positions /
                a mask that do not fit ``act``.
            UnsupportedDtypeError: For complex or integer activations.
        """
        act = self.features_last(act)
        return select_positions(act, self.positions, mask, self.key).reshape(-1, act.shape[-1])


# Site fields saved in its info only when set.
_OPTIONAL = ("arg", "element", "call", "feature_axis", "bypass")


def _unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """The module that holds the sites, and the prefix its names carry in ``model``.

    DDP / DataParallel wrap the model as ``.module``; ``torch.compile`` as ``._orig_mod``.
    Hooks go on the inner modules, which the wrapper runs (compiled code included).
    """
    for wrapper, attribute in _WRAPPERS.items():
        inner = getattr(model, attribute, None)
        if isinstance(inner, nn.Module) and type(model).__name__ == wrapper:
            deeper, prefix = _unwrap(inner)
            return deeper, f"{attribute}.{prefix}"
    return model, ""


_WRAPPERS = {
    "DistributedDataParallel": "module",
    "DataParallel": "module",
    "OptimizedModule": "_orig_mod",
}


def _strip(name: str, prefix: str, modules: Mapping[str, nn.Module]) -> str:
    """A name written with a wrapper's prefix (``module.1``, ``_orig_mod.1``) or without."""
    while prefix and name not in modules:
        head = prefix.split(".", 1)[0] + "."
        if not name.startswith(head):
            break
        name, prefix = name[len(head) :], prefix[len(head) :]
    return name


def find_sites(
    model: nn.Module, pattern: str | Callable[[str], bool] | Iterable[Any] = "*"
) -> list[str]:
    """List module names of ``model`` matching pattern(s), in ``named_modules()`` order.

    A pattern is a glob (``*`` matches any run of characters, dots included:
    ``"blocks.*.mlp.hook_post"``), a callable filter over names (TransformerLens's
    ``names_filter`` habit: ``lambda name: name.endswith("hook_post")``) or a module of the
    model. On a TransformerLens ``TransformerBridge`` the hook aliases
    (``blocks.0.mlp.hook_post``) are names too; a module matched under several names is
    listed once, under the first.

    Args:
        model: Any ``nn.Module`` (TransformerLens models included).
        pattern: A glob, a filter, a module, or several of them; ``"*"`` lists every site.

    Returns:
        Matching dotted names (a DDP wrapper's ``module.`` and a ``torch.compile`` wrapper's
        ``_orig_mod.`` prefixes are dropped; patterns may carry them).

    Raises:
        SiteNotFoundError: If a pattern matches nothing.

    Examples:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> find_sites(model, "*")
        ['0', '1', '2']
        >>> find_sites(model, lambda name: name != "1"), find_sites(model, model[1])
        (['0', '2'], ['1'])
    """
    inner, prefix = _unwrap(model)
    modules = _site_modules(inner)
    names = [name for name in modules if name]
    single = isinstance(pattern, (str, nn.Module)) or callable(pattern)
    patterns = [pattern] if single else list(pattern)  # type: ignore[arg-type]
    found: list[str] = []
    seen: set[int] = set()
    for pat in patterns:
        hits = _matches(model, pat, names, modules, prefix)
        for hit in hits:  # one name per module: a bridge hook matches as path and alias
            if id(modules[hit]) not in seen:
                seen.add(id(modules[hit]))
                found.append(hit)
    return found


def _matches(
    model: nn.Module,
    pattern: Any,
    names: list[str],
    modules: Mapping[str, nn.Module],
    prefix: str,
) -> list[str]:
    """The names one pattern (glob, filter or module) matches; raises if none."""
    if isinstance(pattern, nn.Module):
        hits = [n for n in names if modules[n] is pattern][:1]
        if not hits:
            raise SiteNotFoundError(
                f"The module {type(pattern).__name__} passed as a site is not a submodule of "
                f"{type(model).__name__} (the root itself is Site('')). Pass a module of this "
                'model, or list the sites with dh.find_sites(model, "*").'
            )
        return hits
    if callable(pattern):
        hits = [n for n in names if pattern(n)]
        if not hits:
            raise SiteNotFoundError(
                f"The site filter {getattr(pattern, '__name__', repr(pattern))} matched none "
                f"of the {len(names)} site names of {type(model).__name__}. List them with "
                'dh.find_sites(model, "*").'
            )
        return hits
    if not isinstance(pattern, str):
        raise TypeError(
            f"A site pattern is a glob string, a callable filter over names or a module, got "
            f"{type(pattern).__name__}."
        )
    pattern = pattern[len(prefix) :] if prefix and pattern.startswith(prefix) else pattern
    hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if not hits:
        raise SiteNotFoundError(_not_found_message(model, pattern, names))
    return hits


def _site_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules by site name: ``named_modules()``, or what the model's family lists (a
    TransformerLens bridge adds its hook paths and aliases)."""
    listed = family_hook(model, "site_modules")
    return listed(model) if listed is not None else dict(model.named_modules())


def resolve_sites(model: nn.Module, sites: Any) -> list[tuple[Site, nn.Module]]:
    """Turn names, globs, filters, modules and :class:`Site` objects into ``(site, module)``.

    Raises:
        SiteNotFoundError: For a name that is no module of ``model``, with suggestions.
        ValueError: If two sites would store their statistics under the same key.
    """
    inner, prefix = _unwrap(model)
    modules = _site_modules(inner)
    names = [n for n in modules if n]
    single = isinstance(sites, (str, Site, nn.Module)) or callable(sites)
    items = [sites] if single else list(sites)
    if not items:
        raise ValueError("No sites given. List candidates with dh.find_sites(model, '*').")
    resolved: list[tuple[Site, nn.Module]] = []
    for item in items:
        patterned = isinstance(item, str) and any(c in item for c in _GLOB_CHARS)
        if (
            patterned
            or isinstance(item, nn.Module)
            or (callable(item) and not isinstance(item, str))
        ):
            expanded = [Site(n) for n in find_sites(inner, item)]
        else:
            expanded = [item if isinstance(item, Site) else Site(item)]
        for site in expanded:
            asked = site.name
            name = _strip(asked, prefix, modules)
            if name != asked:  # "module.1" and "1" are one site, stored under "1"
                site = dataclasses.replace(site, name=name)
            # The root ("") is reachable only through an explicit Site(""): the model output.
            if name not in modules or (not name and not isinstance(item, Site)):
                raise SiteNotFoundError(_not_found_message(model, asked, names))
            resolved.append((site, modules[name]))
    keys = [s.key for s, _ in resolved]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(
            f"Sites {duplicates} are given more than once. Give each a distinct "
            "Site(..., label='...') if you want several views of one module."
        )
    return resolved


def resolve_bypass(model: nn.Module, site: Site) -> nn.Module | None:
    """The module whose output a write at ``site`` must change too (see ``Site.bypass``).

    ``site.bypass`` when set; else what the model's family says (a TransformerLens bridge's
    ``hook_resid_mid``); else ``None``.

    Raises:
        SiteNotFoundError: If the bypass names no module of ``model``.
        SiteNotWritableError: If the family refuses writes at the site.
    """
    inner, prefix = _unwrap(model)
    modules = _site_modules(inner)
    name = site.bypass
    family_bypass = family_hook(inner, "write_bypass")
    if name is None and family_bypass is not None:
        name = family_bypass(inner, _strip(site.name, prefix, modules))
    if name is None:
        return None
    found = modules.get(_strip(name, prefix, modules))
    if found is None:
        raise SiteNotFoundError(
            f"Site {site.key!r} names bypass={name!r}, which is no module of "
            f"{type(model).__name__}.{_hint(name, [n for n in modules if n])}"
        )
    return found


def _not_found_message(model: nn.Module, name: str, names: list[str]) -> str:
    return f"Site {name!r} not found in {type(model).__name__}.{_hint(name, names)}"


def _hint(name: str, names: list[str]) -> str:
    """Close names, if any, and where to list them all."""
    suggestions = closest(name, names)
    hint = f" Did you mean {' or '.join(repr(s) for s in suggestions)}?" if suggestions else ""
    return f'{hint} List all sites with dh.find_sites(model, "*").'
