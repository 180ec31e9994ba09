"""An interaction basis at one site as an SAELens sparse-autoencoder folder.

SAELens (``sae_lens.SAE.load_from_disk``) reads a folder holding ``cfg.json`` and
``sae_weights.safetensors`` with ``W_enc`` ``(d_in, d_sae)``, ``b_enc`` ``(d_sae,)``, ``W_dec``
``(d_sae, d_in)`` and ``b_dec`` ``(d_in,)``. Its ``"standard"`` architecture computes

``encode(x) = ReLU((x - b_dec) @ W_enc + b_enc)`` and ``decode(a) = a @ W_dec + b_dec``.

An interaction basis (LIB, PCA or neurons; Bushnaq et al. 2024, arXiv 2405.10928) is linear:
``transform(x) = (x - mean) @ C`` and ``inverse_transform(z) = z @ C_pinv + mean``. SAELens
has no architecture without a nonlinearity, so each feature is written twice, once per sign
(``split_signs=True``, the default):

``W_enc = [C, -C]``, ``b_enc = 0``, ``b_dec = mean``, ``W_dec = [C_pinv; -C_pinv]``,

so latent ``k`` is the positive part of feature ``k`` and latent ``r + k`` its negative part:
``encode(x)[:, k] - encode(x)[:, r + k] = transform(x)[:, k]`` exactly (one of the two is
zero), and ``decode(encode(x)) = inverse_transform(transform(x))``. With
``split_signs=False`` the file holds ``W_enc = C`` and ``W_dec = C_pinv`` (``d_sae = r``): the
pre-activations (SAELens' ``hook_sae_acts_pre``) are the features, and the ReLU of ``encode``
drops their negative values.

Then SAE tooling (dashboards, SAEBench-style evaluations) ranks LIB features beside sparse
autoencoders. ``cfg.json`` follows the layout of SAELens 6 (``metadata.sae_lens_version``
names it) and repeats the fields SAELens 5 and older read at its top level.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

import torch

from .._checks import check_fitted
from .._errors import SaveExistsError, SiteNotFoundError
from ..basis import InteractionBasis

__all__ = ["SAELENS_CONFIG_VERSION", "export_saelens"]

# The SAELens release whose cfg.json layout is written (its SAEConfig.to_dict()).
SAELENS_CONFIG_VERSION = "6.0.0"
_CFG_FILE = "cfg.json"
_WEIGHTS_FILE = "sae_weights.safetensors"
_DTYPES = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}
_LAYER = re.compile(r"(?:^|\.)(?:blocks|layers|h|layer)\.(\d+)(?:\.|$)")


def export_saelens(
    basis: InteractionBasis,
    site: str,
    folder: str | os.PathLike[str],
    *,
    model_name: str | None = None,
    hook_layer: int | None = None,
    dtype: torch.dtype | str = torch.float64,
    split_signs: bool = True,
    context_size: int | None = None,
    prepend_bos: bool = True,
    dataset_path: str = "",
    overwrite: bool = False,
) -> Path:
    """Write the basis of one site as a folder that SAELens loads as a sparse autoencoder.

    The encoder is the basis' :meth:`~degen_hooks.InteractionBasis.transform`, the decoder
    its :meth:`~degen_hooks.InteractionBasis.inverse_transform`, and the hook name is the
    site's module name. Each feature becomes two SAE latents, its positive and its negative
    part (see the module docstring), unless ``split_signs=False``.

    Args:
        basis: A fitted :class:`~degen_hooks.InteractionBasis` (any variant).
        site: The site key (one of ``basis.sites_``).
        folder: The folder to write (created): ``cfg.json`` and ``sae_weights.safetensors``.
        model_name: The model's name for SAE tooling (``"gpt2-small"``); default: ``None``.
        hook_layer: The layer the hook is in, which SAELens 5 and older require; default:
            the number after ``blocks.`` / ``layers.`` / ``h.`` in the hook name, else 0.
        dtype: Dtype of the tensors and of ``cfg.json``'s ``"dtype"``: ``torch.float64``
            (default, the basis' own precision: exact round trips) or ``torch.float32``,
            ``float16``, ``bfloat16`` (or their names).
        split_signs: Write each feature as two latents (``d_sae = 2 r``) so that SAELens'
            ReLU keeps every value; ``False`` writes ``W_enc = C`` (``d_sae = r``).
        context_size: Token positions per sequence the basis was fitted on, for tooling that
            samples activations (``cfg.json``'s ``context_size``); default ``None``.
        prepend_bos: Whether those sequences started with a BOS token.
        dataset_path: The dataset the basis was fitted on, for tooling; default ``""``.
        overwrite: Replace an existing ``cfg.json`` / ``sae_weights.safetensors`` in
            ``folder``. Other files there are never touched.

    Returns:
        The folder, as a ``Path``.

    Raises:
        NotFittedError: If ``basis`` is not fitted.
        SiteNotFoundError: If ``site`` is not a site of ``basis``.
        ValueError: For an unsupported ``dtype``.
        SaveExistsError: If ``folder`` already holds an SAE and ``overwrite=False``.

    Examples:
        >>> import json, tempfile, torch, degen_hooks as dh
        >>> from safetensors.torch import load_file
        >>> acts = torch.randn(200, 4, dtype=torch.float64)
        >>> stats = dh.Statistics({"h": dh.SiteStatistics(acts=dh.Covariance().update(acts))})
        >>> pca = dh.InteractionBasis(variant="pca").fit(stats)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     folder = dh.export_saelens(pca, "h", f"{tmp}/sae")
        ...     w = load_file(f"{folder}/sae_weights.safetensors")
        ...     cfg = json.loads((folder / "cfg.json").read_text())
        >>> hidden = (acts - w["b_dec"]) @ w["W_enc"] + w["b_enc"]   # SAELens, before ReLU
        >>> torch.allclose(hidden[:, :4], pca.transform(acts, "h")), cfg["d_sae"]
        (True, 8)
    """
    check_fitted(basis, ["rotations_"])
    if site not in basis.rotations_:
        raise SiteNotFoundError(
            f"The basis has no site {site!r}; its sites are {list(basis.sites_)}. Pass one of "
            "them as export_saelens(basis, site, folder)."
        )
    torch_dtype, dtype_name = _dtype(dtype)
    folder = Path(folder)
    existing = [name for name in (_CFG_FILE, _WEIGHTS_FILE) if (folder / name).exists()]
    if existing and not overwrite:
        raise SaveExistsError(
            f"{folder} already holds {existing}. Pass overwrite=True to replace them, or "
            "export to another folder."
        )
    rotation, pinv = basis.rotations_[site], basis.pinv_[site]
    mean = basis.means_[site]
    d_in, r = rotation.shape
    if split_signs:
        w_enc, w_dec = torch.cat([rotation, -rotation], dim=1), torch.cat([pinv, -pinv])
    else:
        w_enc, w_dec = rotation, pinv
    tensors = {
        "W_enc": w_enc,
        "b_enc": torch.zeros(w_enc.shape[1], dtype=torch.float64),
        "W_dec": w_dec,
        "b_dec": mean,
    }
    tensors = {k: v.detach().to("cpu", torch_dtype).contiguous() for k, v in tensors.items()}
    info = dict(basis.site_info_.get(site, {}))
    hook_name = info.get("name") or site
    cfg = _config(
        d_in=d_in,
        d_sae=int(w_enc.shape[1]),
        dtype=dtype_name,
        hook_name=hook_name,
        hook_layer=_hook_layer(hook_name) if hook_layer is None else int(hook_layer),
        model_name=model_name,
        context_size=context_size,
        prepend_bos=prepend_bos,
        dataset_path=dataset_path,
        provenance=_provenance(basis, site, info, split_signs, r),
    )
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomic(folder / _WEIGHTS_FILE, lambda tmp: _save_safetensors(tensors, tmp))
    _write_atomic(folder / _CFG_FILE, lambda tmp: tmp.write_text(json.dumps(cfg, indent=2)))
    return folder


def _dtype(dtype: torch.dtype | str) -> tuple[torch.dtype, str]:
    if isinstance(dtype, str):
        named = {name: value for value, name in _DTYPES.items()}
        key = dtype.removeprefix("torch.")
        if key in named:
            return named[key], key
    elif dtype in _DTYPES:
        return dtype, _DTYPES[dtype]
    raise ValueError(
        f"dtype must be one of {sorted(_DTYPES.values())} (a torch.dtype or its name), got "
        f"{dtype!r}. Use torch.float64 for exact round trips, torch.float32 for smaller files."
    )


def _hook_layer(hook_name: str) -> int:
    """The layer number in a TransformerLens / Hugging Face module path, else 0."""
    match = _LAYER.search(hook_name)
    return int(match.group(1)) if match else 0


def _provenance(
    basis: InteractionBasis, site: str, info: dict[str, Any], split_signs: bool, r: int
) -> dict[str, Any]:
    """What the latents are, for people and tools reading ``cfg.json``."""
    from .. import __version__

    return {
        "library": "degen_hooks",
        "version": __version__,
        "variant": basis.variant,
        "center": basis.center,
        "site": site,
        "site_info": info,
        "n_features": r,
        "split_signs": split_signs,
        "latents": (
            f"latent k < {r}: positive part of feature k; latent {r} + k: its negative part"
            if split_signs
            else "latent k: feature k (negative values dropped by the ReLU of encode)"
        ),
        # Variance of each feature on the fitting data (Lambda for LIB), descending.
        "lambdas": [float(x) for x in basis.lambdas_[site]],
    }


def _config(
    *,
    d_in: int,
    d_sae: int,
    dtype: str,
    hook_name: str,
    hook_layer: int,
    model_name: str | None,
    context_size: int | None,
    prepend_bos: bool,
    dataset_path: str,
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """``cfg.json``: SAELens 6's layout, plus the top-level fields of SAELens 5 and older."""
    shared = {
        "model_name": model_name,
        "hook_name": hook_name,
        "hook_head_index": None,
        "prepend_bos": prepend_bos,
        "context_size": context_size,
        "dataset_path": dataset_path,
        "model_from_pretrained_kwargs": {},
        "neuronpedia_id": None,
        "sae_lens_training_version": None,
    }
    return {
        "architecture": "standard",
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        # Never "hook_z": a hook_z basis is fitted per head (width d_head), not on all heads.
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_CONFIG_VERSION,
            **shared,
            "degen_hooks": provenance,
        },
        # SAELens < 6 reads these at the top level (6 ignores them: metadata holds them).
        **shared,
        "hook_layer": hook_layer,
        "activation_fn_str": "relu",
        "activation_fn_kwargs": {},
        "finetuning_scaling_factor": False,
        "dataset_trust_remote_code": False,
        "seqpos_slice": [None],
    }


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def _write_atomic(path: Path, write: Any) -> None:
    """Write through a temporary file beside ``path``, renamed into place (never half a file)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
