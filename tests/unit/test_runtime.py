"""flowgrpo.runtime: malloc tuning, in-place compilation, forcing eager code."""

from __future__ import annotations

import sys

import pytest
import torch

from flowgrpo.runtime import compile_module, force_eager, is_compiled, tune_malloc


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tune_malloc_applies_on_linux():
    assert tune_malloc() is True
    # big allocations still work and are freed (heap-served now)
    x = torch.empty(64 << 20, dtype=torch.uint8)
    x.fill_(1)
    assert int(x.sum()) == 64 << 20


class _Net(torch.nn.Module):
    def __init__(self, trace: list[bool]):
        super().__init__()
        self.trace = trace
        self.lin = torch.nn.Linear(16, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.trace.append(torch.compiler.is_compiling())
        return torch.nn.functional.gelu(self.lin(x), approximate="tanh").sum(-1)


def test_compile_in_place_same_object_same_numbers_and_force_eager():
    torch.manual_seed(0)
    trace: list[bool] = []
    net = _Net(trace)
    x = torch.randn(4, 16)
    eager = net(x)
    assert trace == [False] and not is_compiled(net)
    assert compile_module(net) is net and is_compiled(net)
    out = net(x)
    assert trace[-1] is True  # traced by dynamo
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    out.sum().backward()  # the compiled module trains
    assert net.lin.weight.grad is not None and net.lin.weight.grad.abs().sum() > 0
    with force_eager():
        again = net(x)
    assert trace[-1] is False  # the eager code ran
    torch.testing.assert_close(again, eager)
    assert list(net.state_dict()) == ["lin.weight", "lin.bias"]  # no wrapper prefix: checkpoints are unchanged
