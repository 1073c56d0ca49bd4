"""``--budget`` (issue 16): parsing, memory estimates, the per-sample ladder and its recorded fallbacks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from robkd.bounds import BoundedModel, certify
from robkd.bounds.budget import MILP_MAX_RELUS, Budget, certify_budget, estimate_bytes, milp_applicable
from robkd.bounds.milp import verify_milp
from robkd.errors import UsageError
from robkd.models import RobustModel
from robkd.types import ModelMeta, Norm


@pytest.mark.parametrize(
    "text,seconds,memory",
    [("30s,2GB", 30.0, 2 * 10**9), ("2GB,30s", 30.0, 2 * 10**9), ("1.5m", 90.0, None), ("512MiB", None, 512 * 2**20),
     ("250ms, 1e3KB", 0.25, 10**6), ("1h", 3600.0, None)],
)
def test_budget_parse(text, seconds, memory):
    b = Budget.parse(text)
    assert b.seconds == pytest.approx(seconds) if seconds is not None else b.seconds is None
    assert b.memory_bytes == memory


@pytest.mark.parametrize("text", ["", "30", "30s,40s", "1GB,2GB", "-1s", "0s", "3 parsecs", "30s;2GB", "nan s"])
def test_budget_parse_rejects(text):
    with pytest.raises(UsageError):
        Budget.parse(text)


def _mlp(hidden: int = 8, seed: int = 0, depth: int = 1) -> RobustModel:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(6, hidden), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(hidden, hidden), nn.ReLU()]
    net = nn.Sequential(*layers, nn.Linear(hidden, 3))
    return RobustModel(net, ModelMeta(input_shape=(6,), num_classes=3)).eval()


def test_memory_estimates_by_hand():
    bm = BoundedModel(_mlp(8), (6,))
    nodes = sum(math.prod(op.out_shape) for op in bm.ops) + 6
    assert bm.total_relus == 8
    base = 4 * (2 * nodes + 3 * 8)
    assert estimate_bytes(bm, "alpha-crown", specs=2) == base + 4 * 2 * (5 * 8 + 3 * nodes)
    # MILP: float64 expressions over 6 inputs + U unstable, 3 big-M rows per unstable ReLU
    assert estimate_bytes(bm, "milp", specs=2, unstable=5) == 8 * (nodes * (6 + 5) + 3 * 5 * (6 + 10))
    assert estimate_bytes(bm, "crown", specs=2, chunk_elements=10**6) > estimate_bytes(bm, "crown", specs=2, chunk_elements=10)
    assert milp_applicable(bm, Norm.LINF) == ""
    assert "Linf" in milp_applicable(bm, Norm.L2)
    big = BoundedModel(_mlp(MILP_MAX_RELUS + 1), (6,))
    assert "too large" in milp_applicable(big, Norm.LINF)


def _data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 6, generator=g)
    return x


def test_budget_ladder_is_sound_and_at_least_as_tight_as_crown():
    m = _mlp(16, 1, depth=2)
    x = _data(24, 1)
    with torch.no_grad():
        y = m(x).argmax(1)
    y[:3] = (y[:3] + 1) % 3  # three misclassified samples
    eps = 0.4
    res = certify_budget(m, x, y, eps, Budget(seconds=20.0), norm=Norm.LINF)
    crown = certify(m, x, y, eps, method="crown")
    exact = verify_milp(m, x, y, eps, time_limit=20)
    assert res.method == "budget" and len(res.decided_by) == len(res.sample_seconds) == 24
    assert set(res.decided_by) <= {"ibp", "crown-ibp", "counterexample", "crown", "alpha-crown", "milp", "misclassified"}
    assert res.decided_by[:3] == ["misclassified"] * 3
    for i in range(24):
        assert not (crown.certified[i] and not res.certified[i])  # never looser than CROWN
        if exact[i].status == "falsified":
            assert not res.certified[i]  # sound
        if exact[i].status in ("verified", "falsified"):
            # MILP is the last rung on this small net: every sample ends decided, as the exact answer says
            assert res.status[i] == {"verified": "certified", "falsified": "falsified"}[exact[i].status]
    # the ladder escalated past CROWN-IBP for some samples, and certified margins are positive lower bounds
    assert {"crown", "milp"} <= set(res.decided_by)
    assert all(bool((res.margin_lb[i] > 0).all()) for i in range(24) if res.certified[i])


def test_memory_cap_skips_stages_and_records_why():
    m = _mlp(16, 1, depth=2)
    x = _data(8, 1)
    with torch.no_grad():
        y = m(x).argmax(1)
    res = certify_budget(m, x, y, 0.4, Budget(seconds=20.0, memory_bytes=600))
    crown = certify(m, x, y, 0.4, method="ibp")
    assert torch.equal(res.certified & ~crown.certified, torch.zeros(8, dtype=torch.bool))  # IBP only: no tighter
    assert set(res.decided_by) <= {"ibp", "misclassified"}
    assert all("cap" in f for f, s in zip(res.fallbacks, res.status))


def test_time_budget_abandons_costly_stages_and_records_it():
    m = _mlp(16, 1, depth=2)
    x = _data(8, 1)
    with torch.no_grad():
        y = m(x).argmax(1)
    res = certify_budget(m, x, y, 0.6, Budget(seconds=1e-9))
    undecided = [i for i, s in enumerate(res.status) if s == "unknown"]
    assert undecided, "the radius should leave samples undecided by CROWN-IBP"
    for i in undecided:
        assert "time budget" in res.fallbacks[i]
        assert res.decided_by[i] in ("ibp", "crown-ibp")
