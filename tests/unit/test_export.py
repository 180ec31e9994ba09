"""Exports other tools open: SAELens folders and attribution-graph JSON, each round-tripped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import degen_hooks as dh
from degen_hooks.export import GRAPH_SCHEMA_VERSION, SAELENS_CONFIG_VERSION, graph_schema
from tests.cases import inputs, relu_mlp

F64 = torch.float64


def fitted(variant: str = "lib", *, labelled: bool = False):
    """A basis of sites "1" and "3" of the ReLU MLP, its training inputs and the hidden acts."""
    model = relu_mlp()
    x = inputs(400, 5)
    sites = [dh.Site("1", label="hidden") if labelled else "1", "3"]
    kind = "lib" if variant in ("lib", "global") else variant
    basis = dh.build_bases(model, sites, x.split(100), variant=variant, progress=False)
    assert basis.variant == kind
    acts = torch.relu(model[0](x)).detach()
    return model, x, basis, acts


# -- SAELens: the formulas of its "standard" architecture, written out -------------------------
def saelens_encode(weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``ReLU((x - b_dec) @ W_enc + b_enc)`` (apply_b_dec_to_input=True)."""
    return torch.relu(saelens_hidden_pre(weights, x))


def saelens_hidden_pre(weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]


def saelens_decode(weights: dict[str, torch.Tensor], latents: torch.Tensor) -> torch.Tensor:
    return latents @ weights["W_dec"] + weights["b_dec"]


@pytest.mark.parametrize("variant", ["lib", "global", "pca", "neuron"])
def test_saelens_encoder_is_transform_and_decoder_inverse_transform(tmp_path: Path, variant):
    _, _, basis, acts = fitted(variant)
    folder = dh.export_saelens(basis, "1", tmp_path / "sae")
    weights = load_file(folder / "sae_weights.safetensors")
    assert set(weights) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    features = basis.transform(acts, "1")
    r = features.shape[1]
    latents = saelens_encode(weights, acts)
    assert latents.shape == (len(acts), 2 * r) and latents.dtype == F64
    # Latent k is the positive part of feature k, latent r + k its negative part.
    torch.testing.assert_close(latents[:, :r] - latents[:, r:], features, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        saelens_hidden_pre(weights, acts)[:, :r], features, rtol=1e-12, atol=1e-12
    )
    assert bool(((latents[:, :r] == 0) | (latents[:, r:] == 0)).all())
    torch.testing.assert_close(
        saelens_decode(weights, latents),
        basis.inverse_transform(features, "1"),
        rtol=1e-12,
        atol=1e-12,
    )


def test_saelens_without_split_signs_writes_the_rotation_itself(tmp_path: Path):
    _, _, basis, acts = fitted("pca")
    folder = dh.export_saelens(basis, "1", tmp_path / "sae", split_signs=False)
    weights = load_file(folder / "sae_weights.safetensors")
    assert torch.equal(weights["W_enc"], basis.rotations_["1"])
    assert torch.equal(weights["W_dec"], basis.pinv_["1"])
    assert torch.equal(weights["b_dec"], basis.means_["1"])
    features = basis.transform(acts, "1")
    torch.testing.assert_close(saelens_hidden_pre(weights, acts), features, rtol=1e-12, atol=0)
    torch.testing.assert_close(saelens_encode(weights, acts), features.clamp_min(0))


def test_saelens_config_names_the_site_and_its_format(tmp_path: Path):
    _, _, basis, _ = fitted("lib", labelled=True)
    folder = dh.export_saelens(
        basis, "hidden", tmp_path / "sae", model_name="relu-mlp", context_size=1
    )
    cfg = json.loads((folder / "cfg.json").read_text())
    width = basis.widths_["hidden"]
    assert cfg["architecture"] == "standard" and cfg["apply_b_dec_to_input"] is True
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (8, 2 * width, "float64")
    assert cfg["normalize_activations"] == "none" and cfg["reshape_activations"] == "none"
    meta = cfg["metadata"]
    assert meta["sae_lens_version"] == SAELENS_CONFIG_VERSION == "6.0.0"
    # The hook name is the module the site reads, not its label.
    assert meta["hook_name"] == cfg["hook_name"] == "1"
    assert meta["model_name"] == cfg["model_name"] == "relu-mlp"
    assert cfg["hook_layer"] == 0 and cfg["context_size"] == 1
    ours = meta["degen_hooks"]
    assert (ours["site"], ours["variant"], ours["n_features"]) == ("hidden", "lib", width)
    assert ours["lambdas"] == basis.lambdas_["hidden"].tolist()


def test_saelens_hook_layer_from_the_hook_name_and_float32(tmp_path: Path):
    acts = inputs(50, 4)
    stats = dh.Statistics(
        {"blocks.3.mlp.hook_post": dh.SiteStatistics(dh.Covariance().update(acts))}
    )
    basis = dh.InteractionBasis(variant="pca").fit(stats)
    folder = dh.export_saelens(basis, "blocks.3.mlp.hook_post", tmp_path / "a", dtype="float32")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["hook_layer"] == 3 and cfg["dtype"] == "float32"
    weights = load_file(folder / "sae_weights.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())
    hidden = saelens_hidden_pre(weights, acts.float())[:, :4]
    expected = basis.transform(acts, "blocks.3.mlp.hook_post")
    torch.testing.assert_close(hidden.double(), expected, rtol=1e-5, atol=1e-5)  # float32


def test_saelens_errors_say_what_to_pass(tmp_path: Path):
    _, _, basis, _ = fitted("pca")
    with pytest.raises(dh.SiteNotFoundError, match=r"no site '2'; its sites are \['1', '3'\]"):
        dh.export_saelens(basis, "2", tmp_path / "a")
    with pytest.raises(dh.NotFittedError, match="not fitted"):
        dh.export_saelens(dh.InteractionBasis(), "1", tmp_path / "a")
    with pytest.raises(ValueError, match=r"dtype must be one of .*got 'int8'"):
        dh.export_saelens(basis, "1", tmp_path / "a", dtype="int8")
    dh.export_saelens(basis, "1", tmp_path / "a")
    with pytest.raises(dh.SaveExistsError, match="overwrite=True"):
        dh.export_saelens(basis, "1", tmp_path / "a")
    dh.export_saelens(basis, "3", tmp_path / "a", overwrite=True)
    assert json.loads((tmp_path / "a" / "cfg.json").read_text())["hook_name"] == "3"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "cfg.json",
        "sae_weights.safetensors",
    ]


@pytest.mark.slow
def test_saelens_loads_the_folder(tmp_path: Path):
    """SAELens itself (an optional extra, ``pip install 'degen-hooks[saelens]'``)."""
    sae_lens = pytest.importorskip("sae_lens")
    _, _, basis, acts = fitted("lib")
    folder = dh.export_saelens(basis, "1", tmp_path / "sae", model_name="relu-mlp")
    sae = sae_lens.SAE.load_from_disk(folder)
    assert sae.cfg.d_in == 8 and sae.cfg.d_sae == 2 * basis.widths_["1"]
    hook_name = getattr(sae.cfg, "hook_name", None) or sae.cfg.metadata.hook_name
    assert hook_name == "1"
    features = basis.transform(acts, "1")
    r = features.shape[1]
    with torch.no_grad():
        latents = sae.encode(acts)
        torch.testing.assert_close(latents[:, :r] - latents[:, r:], features, rtol=1e-12, atol=0)
        torch.testing.assert_close(
            sae.decode(latents), basis.inverse_transform(features, "1"), rtol=1e-12, atol=1e-12
        )


# -- attribution-graph JSON ---------------------------------------------------------------------
def fitted_graph(output: bool = True):
    model, x, basis, _ = fitted("lib")
    graph = dh.InteractionGraph().fit(model, basis, x.split(100), output=output, progress=False)
    return graph


def read_back(document: dict) -> tuple[dict, dict]:
    """Edges ``{pair: E}`` and Lambdas ``{site: Lambda}`` rebuilt from the nodes and links."""
    nodes = {node["node_id"]: node for node in document["nodes"]}
    sites = document["metadata"]["degen_hooks"]["sites"]
    lambdas = {}
    for site in sites:
        values = sorted((n["feature"], n["lambda"]) for n in nodes.values() if n["site"] == site)
        lambdas[site] = torch.tensor([v for _, v in values], dtype=F64)
    edges = {}
    for source_site, target_site in document["metadata"]["degen_hooks"]["pairs"]:
        matrix = torch.zeros(len(lambdas[target_site]), len(lambdas[source_site]), dtype=F64)
        for link in document["links"]:
            source, target = nodes[link["source"]], nodes[link["target"]]
            if source["site"] == source_site and target["site"] == target_site:
                matrix[target["feature"], source["feature"]] = link["weight"]
        edges[(source_site, target_site)] = matrix
    return edges, lambdas


def test_graph_export_round_trips_edges_and_lambdas(tmp_path: Path):
    graph = fitted_graph()
    path = dh.export_graph(graph, tmp_path / "relu-mlp.json", scan="relu-mlp")
    document = json.loads(path.read_text())
    edges, lambdas = read_back(document)
    assert list(edges) == graph.pairs_
    for pair, matrix in edges.items():
        assert torch.equal(matrix, graph.edges_[pair].to(F64)), pair
    for site, values in lambdas.items():
        assert torch.equal(values, graph.lambdas_[site].to(F64)), site
    ids = [node["node_id"] for node in document["nodes"]]
    assert len(ids) == len(set(ids)) == sum(len(v) for v in graph.lambdas_.values())
    assert {link["source"] for link in document["links"]} <= set(ids)
    meta = document["metadata"]
    assert (meta["slug"], meta["scan"], meta["schema_version"]) == ("relu-mlp", "relu-mlp", 1)


def test_graph_export_validates_against_its_schema(tmp_path: Path):
    jsonschema = pytest.importorskip("jsonschema")
    schema = graph_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    assert schema["version"] == GRAPH_SCHEMA_VERSION == 1
    for output in (True, False):
        graph = fitted_graph(output=output)
        document = json.loads(
            dh.export_graph(
                graph, tmp_path / "g.json", edge_threshold=0.9, node_threshold=0.8
            ).read_text()
        )
        jsonschema.validate(document, schema)
    broken = dict(document, metadata={**document["metadata"], "schema_version": 2})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_graph_nodes_layers_types_and_influence(tmp_path: Path):
    graph = fitted_graph()
    document = json.loads(dh.export_graph(graph, tmp_path / "g.json").read_text())
    by_layer: dict[str, list[dict]] = {}
    for node in document["nodes"]:
        by_layer.setdefault(node["layer"], []).append(node)
    assert sorted(by_layer) == ["0", "1", "2"]
    assert {n["feature_type"] for n in by_layer["0"]} == {"lib feature"}
    assert {n["feature_type"] for n in by_layer["2"]} == {"logit"}  # the raw model output
    first = by_layer["0"]
    lam = graph.lambdas_["1"]
    assert [n["activation"] for n in first] == lam.tolist()
    torch.testing.assert_close(
        torch.tensor([n["influence"] for n in first], dtype=F64), lam.cumsum(0) / lam.sum()
    )
    assert first[0]["node_id"] == "0_0_0" and first[0]["jsNodeId"] == "0_0-0"
    assert {n["ctx_idx"] for n in document["nodes"]} == {0}
    assert document["metadata"]["prompt_tokens"] == ["<data>"]


def test_graph_edge_threshold_keeps_the_fewest_strongest_edges(tmp_path: Path):
    graph = fitted_graph()
    document = json.loads(
        dh.export_graph(graph, tmp_path / "g.json", edge_threshold=0.9).read_text()
    )
    for index, pair in enumerate(graph.pairs_):
        weights = graph.edges_[pair].flatten().sort(descending=True).values.to(F64)
        expected = int((weights.cumsum(0) < 0.9 * weights.sum()).sum()) + 1
        source_layer = str(index)
        kept = [
            link["weight"]
            for link in document["links"]
            if link["source"].split("_")[0] == source_layer
        ]
        assert len(kept) == expected
        assert kept == weights[:expected].tolist()
    assert document["metadata"]["pruning_settings"] == {"edge_threshold": 0.9}


def test_graph_export_errors(tmp_path: Path):
    graph = fitted_graph()
    with pytest.raises(ValueError, match=r"slug 'My Graph' .*e.g. 'my-graph'"):
        dh.export_graph(graph, tmp_path / "g.json", slug="My Graph")
    with pytest.raises(ValueError, match=r"edge_threshold must be a share .*got 1.5"):
        dh.export_graph(graph, tmp_path / "g.json", edge_threshold=1.5)
    with pytest.raises(dh.NotFittedError):
        dh.export_graph(dh.InteractionGraph(), tmp_path / "g.json")
    dh.export_graph(graph, tmp_path / "g.json")
    with pytest.raises(dh.SaveExistsError, match="overwrite=True"):
        dh.export_graph(graph, tmp_path / "g.json", overwrite=False)
    # A loaded graph (no basis_) still exports, with a neutral feature type.
    dh.save(graph, tmp_path / "saved")
    loaded = dh.load(tmp_path / "saved")
    document = json.loads(dh.export_graph(loaded, tmp_path / "Loaded Graph.json").read_text())
    assert document["metadata"]["slug"] == "loaded-graph"
    assert {n["feature_type"] for n in document["nodes"] if n["layer"] == "0"} == {"basis feature"}
