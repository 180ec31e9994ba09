"""The one reader of the closed forms (``degen_hooks._read_pass.SiteReader``): one forward
pass per batch that reads named sites, stops once it has them, and refuses what it cannot
read exactly (a site never reached, a module run twice)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import degen_hooks as dh
from degen_hooks._read_pass import SiteReader


class Counted(nn.Module):
    """The identity, counting its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), Counted()).double()


def test_reads_and_stops_once_it_has_them():
    net, x = model(), torch.randn(5, 3, dtype=torch.float64)
    reader = SiteReader(net, {"a": dh.Site("0"), "b": dh.Site("1")})
    captured, reached, output = reader(x)
    torch.testing.assert_close(captured["b"], torch.tanh(net[0](x)))
    assert reached is None and output is None and net[3].calls == 0  # stopped at "1"
    assert not captured["a"].requires_grad
    _, reached, _ = SiteReader(net, {"a": dh.Site("0")}, until=dh.Site("2"))(x)
    torch.testing.assert_close(reached, net[2](torch.tanh(net[0](x))))
    assert net[3].calls == 0
    _, _, output = SiteReader(net, {"a": dh.Site("0")}, output=True)(x)
    torch.testing.assert_close(output, net(x).detach())
    assert net[3].calls == 2  # the whole pass, and the reference above
    assert all(not m._forward_hooks for m in net.modules())


def test_a_site_never_reached_or_run_twice_is_refused():
    net, x = model(), torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(dh.SiteNotFiredError, match=r"never reached \['2'\]"):
        SiteReader(net, {"a": dh.Site("0"), "c": dh.Site("2")}, lambda m, b: m[0](b))(x)
    shared = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).double()

    def twice(m, b):  # the Tanh module runs twice
        return m[2](m[1](m[0](m[1](b))))

    with pytest.raises(dh.ShapeMismatchError, match=r"\['1'\], whose modules ran more than once"):
        SiteReader(shared, {"tanh": dh.Site("1")}, twice, until=dh.Site("2"))(x)
    assert all(not m._forward_hooks for m in shared.modules())


def test_hooks_are_removed_when_the_forward_raises():
    net = model()

    def failing(m, b):
        m[0](b)
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        SiteReader(net, {"a": dh.Site("2")}, failing)(torch.randn(2, 3, dtype=torch.float64))
    assert all(not m._forward_hooks for m in net.modules())
