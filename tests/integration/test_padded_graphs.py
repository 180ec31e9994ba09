"""Interaction graphs on padded batches (#19): ``InteractionGraph.fit(mask=...)``.

Padding is no sample and no probe, as in ``build_bases(mask=...)``: a graph of right-padded
batches equals the graph of the same rows trimmed to their real tokens, one row per batch
(an independent reference: no mask anywhere), and the closed forms equal backward passes
under the same mask, with right and left padding, exact, stochastic and integrated edges.
Before, ``fit`` took no mask and counted every padding token as a sample.
"""

from __future__ import annotations

import pytest
import torch

import degen_hooks as dh
from degen_hooks.graph import InteractionGraph

from .conftest import D_VOCAB, N_CTX
from .test_graph_closed_form import RULES, block_sites, quiet

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
RTOL = 1e-10
POSITIONS = [(None, None), (None, "last"), ([0, 2, 3], [1, 3])]
POSITION_IDS = ["all", "last", "lists"]


def padded(side: str, seed: int = 4) -> list[dict[str, torch.Tensor]]:
    """Two batches of token ids and their masks, padded on ``side``."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for lengths in ([5, 3, 4, 2], [1, 5, 2]):
        mask = torch.zeros(len(lengths), N_CTX, dtype=torch.long)
        for row, length in enumerate(lengths):
            if side == "right":
                mask[row, :length] = 1
            else:
                mask[row, N_CTX - length :] = 1
        tokens = torch.randint(0, D_VOCAB, mask.shape, generator=gen)
        batches.append({"tokens": tokens, "mask": mask})
    return batches


def trimmed(batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Every right-padded row alone, cut to its real tokens: no padding, no mask."""
    return [
        batch["tokens"][row, : int(batch["mask"][row].sum())][None]
        for batch in batches
        for row in range(len(batch["tokens"]))
    ]


def tl_forward(model, batch):
    return model(batch["tokens"], attention_mask=batch["mask"])


def tl_mask(batch):
    return batch["mask"].bool()


def assert_same_edges(graph: InteractionGraph, expected: InteractionGraph, rtol=RTOL) -> None:
    assert graph.pairs_ == expected.pairs_ and graph.n_rows_ == expected.n_rows_
    for pair in graph.pairs_:
        reference = expected.edges_[pair]
        torch.testing.assert_close(
            graph.edges_[pair], reference, rtol=rtol, atol=rtol * 1e-4 * float(reference.max())
        )
    for key, lambdas in expected.lambdas_.items():
        torch.testing.assert_close(graph.lambdas_[key], lambdas, rtol=1e-9, atol=1e-12)


def tl_basis(model, positions):
    sites = block_sites(positions, n_layers=2)
    tokens = torch.randint(0, D_VOCAB, (12, N_CTX), generator=torch.Generator().manual_seed(1))
    return quiet(dh.build_bases, model, sites, list(tokens.split(6)),
                 output_positions=positions[1], progress=False)  # fmt: skip


@pytest.mark.parametrize("positions", POSITIONS[:2], ids=POSITION_IDS[:2])
@pytest.mark.parametrize("sections", ["auto", None], ids=["closed", "backward"])
def test_padded_graph_equals_the_graph_of_trimmed_rows(plain_model, positions, sections):
    """Attention, MLP and unembedding pairs: padding counts for nothing, in either path."""
    model = plain_model
    basis = tl_basis(model, positions)
    kw = {"output": True, "output_positions": positions[1], "progress": False,
          "sections": sections}  # fmt: skip
    batches = padded("right")
    graph = InteractionGraph().fit(model, basis, batches, forward=tl_forward, mask=tl_mask, **kw)
    expected = InteractionGraph().fit(model, basis, trimmed(batches), **kw)
    assert_same_edges(graph, expected)
    assert graph.n_rows_[graph.pairs_[0]] == sum(int(b["mask"].sum()) for b in batches)
    if sections == "auto":
        assert graph.closed_form_ == graph.pairs_


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("rule", RULES.values(), ids=RULES.keys())
@pytest.mark.parametrize("positions", POSITIONS, ids=POSITION_IDS)
def test_padded_closed_forms_equal_backward_passes(plain_model, side, rule, positions):
    model = plain_model
    basis = tl_basis(model, positions)
    kw = {"output": True, "output_positions": positions[1], "progress": False,
          "forward": tl_forward, "mask": tl_mask}  # fmt: skip
    batches = padded(side)
    closed = InteractionGraph(**rule).fit(model, basis, batches, **kw)
    backward = InteractionGraph(**rule).fit(model, basis, batches, sections=None, **kw)
    assert closed.closed_form_ and not backward.closed_form_
    assert_same_edges(closed, backward)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_hugging_face_padded_graphs(family, side):
    """Rotary and grouped-query attention, the norm and MLP, the final norm and
    ``lm_head``, all in closed form on padded batches; right padding also equals the
    trimmed rows."""
    from degen_hooks.families import hf

    from .test_hf import build, padded_batches
    from .test_hf_sections import float64_norms

    model = float64_norms(build(family))
    sites = hf.decoder_sites(model, ["resid_pre", "resid_mid", "resid_post"], layers=[1],
                             positions="last")  # fmt: skip
    sites[0] = dh.Site(sites[0].name, sites[0].io, arg=sites[0].arg)  # every position
    batches = [padded_batches()[0 if side == "right" else 1]]
    unpadded = [{"input_ids": b["input_ids"].clamp(min=1)} for b in padded_batches(seed=1)]
    common = {"forward": hf.forward, "progress": False}
    basis = quiet(dh.build_bases, model, sites, unpadded, output_positions="last", **common)
    kw = {**common, "output": True, "output_positions": "last", "mask": hf.mask}
    closed = InteractionGraph().fit(model, basis, batches, **kw)
    backward = InteractionGraph().fit(model, basis, batches, sections=None, **kw)
    assert closed.closed_form_ == closed.pairs_
    assert_same_edges(closed, backward)
    if side == "right":
        rows = [
            {"input_ids": batch["input_ids"][row, : int(batch["attention_mask"][row].sum())][None]}
            for batch in batches
            for row in range(len(batch["input_ids"]))
        ]
        kw.pop("mask")
        assert_same_edges(closed, InteractionGraph().fit(model, basis, rows, **kw))


def test_a_mask_that_does_not_fit_is_refused(plain_model):
    basis = tl_basis(plain_model, (None, "last"))
    batches = padded("right")
    with pytest.raises(dh.ShapeMismatchError, match=r"Mask of shape \(4, 3\)"):
        InteractionGraph().fit(plain_model, basis, batches, forward=tl_forward,
                               mask=lambda b: b["mask"][:, :3].bool(), progress=False)  # fmt: skip


# -- edge ablation ---------------------------------------------------------------------------
def last_real(output, batch):
    """The log-probability of token 0 at each row's last real token."""
    rows = torch.arange(len(output))
    return output[rows, batch["mask"].sum(1) - 1].log_softmax(-1)[:, 0]


def last(output, batch):
    return output[:, -1].log_softmax(-1)[:, 0]


def test_padded_edge_ablation_equals_the_trimmed_rows(plain_model):
    """``ablate_edges(padding=...)`` writes each row's last real token, as the trimmed rows
    are written; before, ``"last"`` wrote position -1, padding in a right-padded row."""
    from degen_hooks.graph import ablate_edges, edge_ablation_curve, min_edges

    model = plain_model
    basis = tl_basis(model, (None, "last"))
    batches = padded("right")
    kw = {"output": True, "output_positions": "last", "progress": False}
    graph = InteractionGraph().fit(model, basis, batches, forward=tl_forward, mask=tl_mask, **kw)
    rows = trimmed(batches)
    padded_kw = {"forward": tl_forward, "padding": tl_mask, "feature_chunk": 3}
    for pair in graph.pairs_[-3:]:  # attention, MLP (last positions), the unembedding
        for k in (0, 5, 17):
            value = ablate_edges(model, graph, pair, batches, metric=last_real, n_edges=k,
                                 **padded_kw)  # fmt: skip
            expected = ablate_edges(model, graph, pair, rows, metric=last, n_edges=k)
            assert value == pytest.approx(expected, rel=1e-10)  # both: the mean over rows
    pair = graph.pairs_[-1]
    result = min_edges(model, graph, pair, batches, metric=last_real, tolerance=0.05,
                       **padded_kw)  # fmt: skip
    reference = min_edges(model, graph, pair, rows, metric=last, tolerance=0.05)
    assert (result.n_edges, result.n_total) == (reference.n_edges, reference.n_total)
    assert result.value == pytest.approx(reference.value, rel=1e-10)
    curve = edge_ablation_curve(model, {"LIB": graph}, pair, batches, metric=last_real,
                                n_edges=[0, 4], progress=False, **padded_kw)  # fmt: skip
    reference = edge_ablation_curve(model, {"LIB": graph}, pair, rows, metric=last,
                                    n_edges=[0, 4], progress=False)  # fmt: skip
    assert curve.values["LIB"] == pytest.approx(reference.values["LIB"], rel=1e-10)
