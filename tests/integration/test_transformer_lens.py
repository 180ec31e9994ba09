"""degen_hooks on TransformerLens models: HookedTransformer and TransformerBridge.

Every test builds tiny float64 models offline (``conftest.py``) and checks the library
against brute force: activation statistics against ``run_with_cache``, the MLP closed form
against exact Jacobian probes, hook bookkeeping against TransformerLens's own.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import degen_hooks as dh
from degen_hooks.closed_form import activation_derivative
from degen_hooks.transformer_lens import (
    ProcessedWeightsWarning,
    is_bridge,
    is_transformer_lens,
    mlp_section,
    mlp_section_sites,
    mlp_sites,
    processing_flags,
    record_metadata,
    resolve_alias,
    site_modules,
)

from .conftest import HAS_HOOKED, config_only, hook_state, requires_hooked, toy_config, warmed_up

RTOL = 1e-9


def rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def cache_of(model, tokens, **kwargs):
    _, cache = model.run_with_cache(tokens, **kwargs)
    return cache


def assert_moments(stats, reference_rows: torch.Tensor) -> None:
    x = reference_rows.to(torch.float64)
    assert stats.n_samples == x.shape[0]
    torch.testing.assert_close(stats.mean(), x.mean(0), rtol=RTOL, atol=1e-12)
    torch.testing.assert_close(stats.cov(), torch.cov(x.T, correction=0), rtol=RTOL, atol=1e-12)


def all_mlp_sites(model) -> list[str]:
    return [name for names in mlp_sites(model).values() for name in names]


# -- statistics vs brute force -------------------------------------------------------------
def test_statistics_match_run_with_cache(model, tokens):
    sites = all_mlp_sites(model)
    pre = mlp_sites(model)["hook_pre"]
    derivative = activation_derivative(model.cfg.act_fn)
    with dh.collect(model, sites, derivatives={p: model.cfg.act_fn for p in pre}) as run:
        with torch.no_grad():
            model(tokens)
    cache = cache_of(model, tokens)
    assert list(run.stats) == sites
    for name in sites:
        assert_moments(run.stats[name].acts, rows(cache[name]))
        assert run.stats[name].n_batches == 1
    for name in pre:
        assert_moments(run.stats[name].derivs, derivative(rows(cache[name])))


def test_mlp_sites_roles(model):
    roles = mlp_sites(model)
    has_norm = model.cfg.normalization_type is not None
    expected = {"hook_resid_pre", "hook_resid_mid", "hook_pre", "hook_post", "hook_mlp_out"}
    assert expected | {"hook_resid_post"} <= set(roles)
    assert ("hook_normalized" in roles) == has_norm
    assert "hook_mlp_in" not in roles  # gated off by default: it would never fire
    assert roles["hook_post"] == ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]
    assert mlp_sites(model, layer=-1)["hook_pre"] == ["blocks.1.mlp.hook_pre"]
    with pytest.raises(dh.SiteNotFoundError, match=r"Layer 2 does not exist: .*n_layers=2"):
        mlp_sites(model, layer=2)


@requires_hooked
def test_hook_mlp_in_listed_once_enabled(build, tokens):
    model = build["hooked"]("relu", None)
    model.set_use_hook_mlp_in(True)
    (name,) = mlp_sites(model, 0)["hook_mlp_in"]
    with dh.collect(model, [name, "blocks.0.hook_resid_mid"]) as run, torch.no_grad():
        model(tokens)
    # Without a norm, the MLP input is the residual stream itself.
    torch.testing.assert_close(
        run.stats[name].acts.cov(), run.stats["blocks.0.hook_resid_mid"].acts.cov(), rtol=0, atol=0
    )


# -- closed form vs exact probes -----------------------------------------------------------
@pytest.mark.parametrize("residual", [False, True], ids=["mlp", "residual"])
@pytest.mark.parametrize("layer", [0, 1])
def test_closed_form_matches_exact_probes(model, tokens, residual, layer):
    if residual and model.cfg.normalization_type is not None:
        with pytest.raises(ValueError, match="block_mlp_section"):
            mlp_section_sites(model, layer, residual=True)
        return
    source, pre, target = mlp_section_sites(model, layer, residual=residual)
    section = mlp_section(model, layer, residual=residual)
    readout = torch.randn(8, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for read in (None, readout):
        with dh.collect(
            model,
            [source, pre],
            jacobians="exact",
            target=target,
            readout=read,
            derivatives={pre: section.activation},
        ) as run:
            model(tokens)
            run.backward()
        exact = run.stats[source].grads.second_moment()
        closed = section.jacobian_gram(run.stats[pre].derivs, read)
        torch.testing.assert_close(closed, exact, rtol=RTOL, atol=1e-12)


def test_mlp_section_layout(build, family):
    model = build[family]("gelu", None)
    section = mlp_section(model, 1)
    block = model.blocks[1].mlp
    assert section.w_in.shape == (16, 8) and section.w_out.shape == (8, 16)
    torch.testing.assert_close(section.w_in, block.W_in.detach().T, rtol=0, atol=0)
    torch.testing.assert_close(section.w_out, block.W_out.detach().T, rtol=0, atol=0)
    assert section.activation == "gelu" and not section.residual


def test_mlp_section_rejects_attention_only():
    model = config_only({**toy_config(), "n_layers": 1, "attn_only": True})
    with pytest.raises(ValueError, match="attention-only"):
        mlp_section(model, 0)


# -- bridge aliases ------------------------------------------------------------------------
def test_bridge_alias_resolution(build):
    bridge = build["bridge"]("relu", "LN")
    assert is_bridge(bridge) and is_transformer_lens(bridge)
    assert resolve_alias(bridge, "blocks.0.mlp.hook_post") == "blocks.0.mlp.out.hook_in"
    assert resolve_alias(bridge, "blocks.0.mlp.hook_pre") == "blocks.0.mlp.in.hook_out"
    assert resolve_alias(bridge, "blocks.1.hook_resid_mid") == "blocks.1.ln2.hook_in"
    assert resolve_alias(bridge, "blocks.1.hook_resid_post") == "blocks.1.hook_out"
    assert resolve_alias(bridge, "blocks.0.mlp.out.hook_in") is None  # already canonical
    assert resolve_alias(bridge, "blocks.0.mlp.hook_pst") is None
    modules = site_modules(bridge)
    assert modules["blocks.0.mlp.hook_post"] is modules["blocks.0.mlp.out.hook_in"]
    assert modules["blocks.0.mlp.hook_post"] is bridge.blocks[0].mlp.out.hook_in
    # named_modules() reaches components through `_original_component`; site names do not.
    assert not any("_original_component" in name for name in modules)
    if HAS_HOOKED:
        hooked = build["hooked"]("relu", None)
        assert not is_bridge(hooked) and is_transformer_lens(hooked)
        assert resolve_alias(hooked, "blocks.0.mlp.hook_post") is None


def test_bridge_alias_keys_and_no_double_count(build, tokens):
    bridge = build["bridge"]("gelu", None)
    names = ["blocks.0.mlp.hook_post", "blocks.0.mlp.out.hook_in", "blocks.1.hook_resid_mid"]
    with dh.collect(bridge, names) as run, torch.no_grad():
        bridge(tokens)
        bridge(tokens)
    assert list(run.stats) == names  # keyed by the names asked for
    cache = cache_of(bridge, tokens)
    for name in names:
        assert run.stats[name].n_batches == 2  # one hook call per forward, not two
        assert_moments(run.stats[name].acts, rows(torch.cat([cache[name]] * 2)))


def test_bridge_glob_gives_one_name_per_hook(build):
    bridge = build["bridge"]("relu", None)
    found = dh.find_sites(bridge, "blocks.0.mlp.*")
    modules = site_modules(bridge)
    assert len({id(modules[n]) for n in found}) == len(found)
    assert "blocks.0.mlp.out.hook_in" in found and "blocks.0.mlp.hook_post" not in found
    assert dh.find_sites(bridge, "blocks.*.mlp.hook_post") == [
        "blocks.0.mlp.hook_post",
        "blocks.1.mlp.hook_post",
    ]


def test_bridge_unknown_site_suggests_alias(build):
    bridge = build["bridge"]("relu", None)
    with pytest.raises(dh.SiteNotFoundError, match=r"Did you mean 'blocks.0.mlp.hook_post'"):
        dh.collect(bridge, ["blocks.0.mlp.hook_pst"]).__enter__()


def test_bridge_alias_survives_compatibility_mode(build, tokens):
    bridge = build["bridge"]("relu", "LN")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge.enable_compatibility_mode(disable_warnings=True)
    # TransformerLens renames the HookPoint to its legacy alias; the component path holds.
    assert bridge.blocks[0].ln2.hook_in.name == "blocks.0.hook_resid_mid"
    assert resolve_alias(bridge, "blocks.0.hook_resid_mid") == "blocks.0.ln2.hook_in"
    names = ["blocks.0.hook_resid_mid", "blocks.0.ln2.hook_in"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProcessedWeightsWarning)  # processed on purpose
        with dh.collect(bridge, names) as run, torch.no_grad():
            bridge(tokens)
    cache = cache_of(bridge, tokens)
    for name in run.stats:
        assert_moments(run.stats[name].acts, rows(cache["blocks.0.hook_resid_mid"]))


# -- real use: evaluation runs, masks, positions -------------------------------------------
def test_eval_run_with_padding_mask_and_last_position(plain_model, tokens):
    model = warmed_up(plain_model, tokens)
    mask = torch.ones(tokens.shape, dtype=torch.long)
    mask[0, 3:] = 0  # right padding
    mask[4, 4:] = 0
    post, resid = "blocks.1.mlp.hook_post", "blocks.0.hook_resid_post"
    with dh.collect(model, [post, dh.Site(resid, positions="last")]) as run:
        run.set_mask(mask.bool())
        with torch.no_grad():
            loss = model(tokens, return_type="loss", attention_mask=mask)
    assert loss.ndim == 0 and torch.isfinite(loss)
    cache = cache_of(model, tokens, attention_mask=mask)
    assert_moments(run.stats[post].acts, cache[post][mask.bool()])
    # With padding, positions="last" is each sequence's last real token.
    lengths = mask.sum(dim=1)
    last = cache[resid][torch.arange(len(tokens)), lengths - 1]
    assert_moments(run.stats[resid].acts, last)


def test_position_selection_without_mask(plain_model, tokens):
    name = "blocks.0.mlp.hook_pre"
    with dh.collect(model := plain_model, [dh.Site(name, positions=slice(1, 3))]) as run:
        with torch.no_grad():
            model(tokens)
    assert_moments(run.stats[name].acts, rows(cache_of(model, tokens)[name][:, 1:3]))


# -- hook hygiene --------------------------------------------------------------------------
def test_no_hooks_left_after_exception(plain_model, tokens):
    model = warmed_up(plain_model, tokens)
    before = hook_state(model)
    with pytest.raises(RuntimeError, match="boom"):
        with dh.collect(
            model, all_mlp_sites(model), jacobians="exact", target="blocks.1.hook_mlp_out"
        ):
            assert hook_state(model) != before
            model(tokens)
            raise RuntimeError("boom")
    assert hook_state(model) == before


def test_tl_hook_contexts_work_inside_the_block(plain_model, tokens):
    model = warmed_up(plain_model, tokens)
    seen: list[str] = []

    def user_hook(act, hook):
        seen.append(hook.name)

    baseline = hook_state(model)
    model.add_hook("blocks.0.hook_resid_pre", user_hook)  # a user hook set up beforehand
    name = "blocks.0.mlp.hook_post"
    with dh.collect(model, [name]) as run, torch.no_grad():
        with model.hooks(fwd_hooks=[(name, user_hook)]):
            model(tokens)
        _, cache = model.run_with_cache(tokens)
        model.reset_hooks()  # TransformerLens removes its own hooks only
        model(tokens)
    assert run.stats[name].n_batches == 3
    assert_moments(run.stats[name].acts, rows(torch.cat([cache[name]] * 3)))
    assert len(seen) == 3  # resid_pre twice (before the reset), hook_post once
    assert hook_state(model) == baseline


def test_tl_hooks_untouched_by_the_block(plain_model, tokens):
    model = warmed_up(plain_model, tokens)
    calls = []
    model.add_hook("blocks.1.hook_resid_post", lambda act, hook: calls.append(1))
    before = hook_state(model)
    with dh.collect(model, ["blocks.1.hook_resid_post"]), torch.no_grad():
        model(tokens)
    assert hook_state(model) == before
    with torch.no_grad():
        model(tokens)
    assert len(calls) == 2
    model.reset_hooks()


def test_output_unchanged_by_collection(plain_model, tokens):
    model = warmed_up(plain_model, tokens)
    with torch.no_grad():
        expected = model(tokens)
    with dh.collect(model, all_mlp_sites(model), firing=True) as run, torch.no_grad():
        got = model(tokens)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert run.stats["blocks.0.mlp.hook_pre"].firing is not None


# -- weight processing ---------------------------------------------------------------------
@requires_hooked
def test_processing_flags_of_raw_and_processed_hooked(build, tokens):
    model = build["hooked"]("gelu", "LN")
    flags = processing_flags(model)
    assert json.loads(json.dumps(flags)) == flags
    assert flags["family"] == "HookedTransformer"
    assert not flags["is_processed"]
    assert not (flags["fold_ln"] or flags["center_writing_weights"] or flags["center_unembed"])
    model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    flags = processing_flags(model)
    assert flags["normalization_type"] == "LNPre"
    assert flags["fold_ln"] and flags["center_writing_weights"] and flags["center_unembed"]
    assert flags["is_processed"]


@requires_hooked
def test_record_metadata_warns_on_processed_model(build, tokens):
    model = build["hooked"]("relu", "LN")
    stats = dh.Statistics()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProcessedWeightsWarning)
        record_metadata(stats, model)  # raw weights: silent
    assert stats.metadata["transformer_lens"]["is_processed"] is False
    model.process_weights_(fold_ln=True, center_writing_weights=False, center_unembed=False)
    with pytest.warns(ProcessedWeightsWarning, match=r"processed weights \(fold_ln\)"):
        flags = record_metadata(stats, model)
    assert stats.metadata["transformer_lens"] == flags and flags["fold_ln"]


def test_degeneracy_report_reads_next_width_through_aliases(model, tokens):
    """hook_post is read by mlp.W_out on both families (a bridge names it by an alias)."""
    sites = ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]
    with dh.collect(model, sites) as run, torch.no_grad():
        model(tokens)
    report = dh.degeneracy_report(run.stats, model=model)
    assert [row.d_next for row in report.sites] == [model.cfg.d_model] * 2


def test_processing_flags_of_bridge(build):
    bridge = build["bridge"]("gelu", "LN")
    flags = processing_flags(bridge)
    assert flags["family"] == "TransformerBridge" and not flags["is_processed"]
    assert flags["weights_processed"] is False and flags["compatibility_mode"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge.enable_compatibility_mode(disable_warnings=True)
    flags = processing_flags(bridge)
    assert flags["weights_processed"] and flags["compatibility_mode"]
    assert flags["fold_ln"] and flags["center_writing_weights"] and flags["center_unembed"]
    assert json.loads(json.dumps(flags)) == flags


@requires_hooked
def test_collect_records_processing_flags(build, tokens):
    model = build["hooked"]("relu", "LN")
    model.process_weights_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with dh.collect(model, ["blocks.0.mlp.hook_post"]) as run, torch.no_grad():
            model(tokens)
    if "transformer_lens" not in run.stats.metadata:
        pytest.skip("dh.collect does not call record_metadata yet (issue 6, lead's wiring)")
    assert run.stats.metadata["transformer_lens"]["fold_ln"]
    assert any(issubclass(w.category, ProcessedWeightsWarning) for w in caught)
