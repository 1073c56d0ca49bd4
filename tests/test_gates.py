"""The gate language: parsing, safe rejection of junk, validation against the audit, judging."""

from __future__ import annotations

import math

import pytest

from robkd.auditing.gates import GateError, Interval, Num, Ref, parse_gate, validate_gate
from robkd.auditing.judging import judge
from robkd.errors import UsageError

RADII = [0.05, 0.1, 8 / 255]
ATTACKS = ["fgsm", "pgd-20", "apgd-ce"]


def table(values: dict[str, tuple[float, float, float] | None]):
    """A lookup from canonical reference keys to intervals."""

    def lookup(ref: Ref):
        v = values[ref.key]
        return None if v is None else Interval(*v)

    return lookup


def test_parse_references_and_precedence():
    g = parse_gate("student.worst@8/255 >= 0.9*teacher.worst@8/255")
    assert [r.key for r in g.refs()] == ["student.worst@8/255", "teacher.worst@8/255"]
    assert g.cmp == ">="
    assert math.isclose(g.refs()[0].radius, 8 / 255)
    # 1 + 2*3 - 4/2 = 5, and unary minus / parentheses
    assert judge("1 + 2*3 - 4/2 >= 5", table({}), on="point").passed
    assert not judge("1 + 2*3 - 4/2 > 5", table({}), on="point").passed
    assert judge("-(2 - 3) * 2 <= 2", table({}), on="point").passed
    assert judge("8/255 < 0.0314", table({}), on="point").passed  # 8/255 = 0.03137...
    assert not judge("8/255 < 0.0313", table({}), on="point").passed
    # attack names with dashes, a minus right after a keyword, scientific radii
    g = parse_gate("student.pgd-20@1e-1 - 0.05 > student.clean-0.5")
    keys = [r.key for r in g.refs()]
    assert keys == ["student.pgd-20@0.1", "student.clean"]
    assert isinstance(g.lhs.right, Num) and g.lhs.op == "-"


@pytest.mark.parametrize(
    "junk",
    [
        "__import__('os').system('echo hi')",
        "student.clean >= 0.5; import os",
        "student.clean >= 0.5 and 1",
        "student.clean.__class__ >= 1",
        "student.clean >= 2**3",
        "student.clean >= lambda: 1",
        "open('/etc/passwd') > 0",
        "student.clean",
        "student.clean >= ",
        ">= 1",
        "1 >= 2 >= 3",
        "(1 >= 2",
        "1 >= 2)",
        "student.worst >= 0.5",
        "student.clean@0.1 >= 0.5",
        "teacher.worst@ >= 0.5",
        "transfer.bogus@0.1 >= 0.5",
        "transfer.clean >= 0.5",
        "models.worst@0.1 > 1",
        "",
        "   ",
        "1 == 1",
        "(" * 200 + "1" + ")" * 200 + " > 0",
        "x" * 600,
    ],
)
def test_junk_is_rejected_with_a_usage_error(junk):
    with pytest.raises(GateError) as info:
        parse_gate(junk)
    assert isinstance(info.value, UsageError)
    assert str(info.value)


def test_validation_against_the_audit():
    ok = parse_gate("student.pgd-20@0.1 >= 0.9*teacher.worst@0.05 + transfer.ratio@8/255 - student.clean")
    validate_gate(ok, radii=RADII, attacks=ATTACKS, certified=False)
    with pytest.raises(GateError, match="not audited"):
        validate_gate(parse_gate("student.worst@0.2 >= 0.5"), radii=RADII, attacks=ATTACKS, certified=False)
    with pytest.raises(GateError, match="not audited"):
        validate_gate(parse_gate("transfer.ratio@7/255 >= 0.5"), radii=RADII, attacks=ATTACKS, certified=False)
    with pytest.raises(GateError, match="audited attack"):
        validate_gate(parse_gate("student.square@0.1 >= 0.5"), radii=RADII, attacks=ATTACKS, certified=False)
    with pytest.raises(GateError, match="certification"):
        validate_gate(parse_gate("student.certified@0.1 >= 0.5"), radii=RADII, attacks=ATTACKS, certified=False)
    validate_gate(parse_gate("student.certified@0.1 >= 0.5"), radii=RADII, attacks=ATTACKS, certified=True)


def test_conservative_judgement_uses_lower_vs_upper_bounds():
    vals = {"student.worst@0.1": (0.80, 0.75, 0.85), "teacher.worst@0.1": (0.82, 0.78, 0.86)}
    g = "student.worst@0.1 >= 0.9*teacher.worst@0.1"
    # point: 0.80 >= 0.738 passes; bounds: 0.75 >= 0.9*0.86 = 0.774 fails
    assert judge(g, table(vals), on="point").passed
    res = judge(g, table(vals))
    assert not res.passed
    assert res.compared[0] == pytest.approx(0.75) and res.compared[1] == pytest.approx(0.774)
    assert "lower 95% bound" in res.reason and "upper 95% bound" in res.reason
    assert res.references["student.worst@0.1"].lo == 0.75
    # reversed comparison: the upper bound of the left side must stay below the lower bound of the right
    assert judge("student.worst@0.1 <= 0.9", table(vals)).passed  # 0.85 <= 0.9
    assert not judge("student.worst@0.1 <= 0.84", table(vals)).passed  # 0.85 > 0.84
    assert judge("student.worst@0.1 <= 0.84", table(vals), on="point").passed
    # subtraction widens correctly: (s - t) in [0.75-0.86, 0.85-0.78]
    res = judge("student.worst@0.1 - teacher.worst@0.1 > -0.2", table(vals))
    assert res.passed and res.lhs.lo == pytest.approx(-0.11) and res.lhs.hi == pytest.approx(0.07)
    # negation flips the interval
    res = judge("-student.worst@0.1 < -0.7", table(vals))
    assert res.passed and res.lhs.hi == pytest.approx(-0.75)


def test_undefined_values_fail_with_a_reason():
    vals = {"transfer.ratio@0.1": None, "teacher.worst@0.1": (0.0, 0.0, 0.03)}
    res = judge("transfer.ratio@0.1 >= 0.9", table(vals))
    assert not res.passed and "undefined" in res.reason
    res = judge("1 / teacher.worst@0.1 >= 0.9", table(vals))
    assert not res.passed and "contains 0" in res.reason
    res = judge("1 / 0 >= 0.9", table(vals), on="point")
    assert not res.passed
    d = res.to_dict()
    assert d["passed"] is False and d["gate"] == "1 / 0 >= 0.9"


def test_unknown_mode_rejected():
    with pytest.raises(UsageError):
        judge("1 > 0", table({}), on="upper")


def _paired(vectors: dict):
    """Per-sample lookup and samples functions from indicator vectors (ratio: (num, den))."""
    import numpy as np

    def samples(ref: Ref):
        v = vectors.get(ref.key)
        return None if v is None else (v if isinstance(v, tuple) else (np.asarray(v, float), None))

    def lookup(ref: Ref):
        num, den = samples(ref)
        p = num.sum() / (den.sum() if den is not None else len(num))
        return Interval(p, p - 0.1, p + 0.1)  # deliberately wide: the paired rule must not use these

    return lookup, samples


def test_paired_judgement_on_shared_samples():
    import numpy as np

    rng = np.random.default_rng(0)
    s = (rng.random(400) < 0.5).astype(float)
    lookup, samples = _paired({"student.worst@0.1": s, "teacher.worst@0.1": s.copy(),
                               "transfer.ratio@0.1": (s, s.copy())})
    # a perfect copy passes on every resample; the unpaired interval rule fails it (0.4 < 0.9 * 0.6)
    g = "student.worst@0.1 >= 0.9*teacher.worst@0.1"
    res = judge(g, lookup, samples=samples)
    assert res.passed and res.method == "paired-bootstrap" and res.holds_fraction == 1.0
    assert not judge(g, lookup).passed  # without per-sample outcomes: conservative intervals
    assert judge("transfer.ratio@0.1 >= 1", lookup, samples=samples).passed
    # a student that loses 20 of the teacher's ~200 robust samples: ratio ~0.9, so >= 0.99 fails, >= 0.8 passes
    s2 = s.copy()
    s2[np.flatnonzero(s)[:20]] = 0.0
    lookup, samples = _paired({"student.worst@0.1": s2, "teacher.worst@0.1": s})
    assert not judge("student.worst@0.1 >= 0.99*teacher.worst@0.1", lookup, samples=samples).passed
    res = judge("student.worst@0.1 >= 0.8*teacher.worst@0.1", lookup, samples=samples)
    assert res.passed and res.compared[0] > 0
    # hand check of the fraction: d = s2 - 0.9 s per sample has mean -0.0017 and sd/sqrt(n) ~ 0.0068
    res = judge("student.worst@0.1 >= 0.9*teacher.worst@0.1", lookup, samples=samples, resamples=4000)
    d = s2 - 0.9 * s
    from scipy.stats import norm

    assert res.holds_fraction == pytest.approx(norm.sf(-d.mean() / (d.std() / math.sqrt(len(d)))), abs=0.04)
    # point mode and single-metric gates do not resample
    assert judge(g, lookup, samples=samples, on="point").method == "point"
    assert judge("student.worst@0.1 >= 0.3", lookup, samples=samples).method == "interval"


def test_paired_judgement_undefined_and_bad_input():
    import numpy as np

    zero = np.zeros(50)
    lookup, samples = _paired({"transfer.ratio@0.1": (zero, zero), "student.worst@0.1": zero})
    res = judge("transfer.ratio@0.1 >= 0.5", lambda r: Interval(1.0, 0.5, 1.5), samples=samples)
    assert not res.passed and res.holds_fraction == 0.0  # 0/0 on every resample counts against the gate
    res = judge("student.worst@0.1 >= teacher.worst@0.1", lambda r: Interval(0.0, 0.0, 0.1), samples=samples)
    assert not res.passed and "undefined" in res.reason
    with pytest.raises(GateError):
        judge("student.worst@0.1 >= 0", lookup, samples=samples, resamples=5)


def test_messages_state_the_comparison_that_holds_and_the_shortfall():
    """Issue 14: a FAIL row reads as a failure, constants carry no bound, the shortfall is stated."""
    vals = {"student.worst@0.1": (0.24, 0.21, 0.27), "teacher.worst@0.1": (0.59, 0.55, 0.6333)}
    res = judge("student.worst@0.1 >= 0.9*teacher.worst@0.1", table(vals))
    assert res.reason == ("FAIL: student.worst@0.1 = 0.24 (lower 95% bound 0.21) < 0.9 x teacher.worst@0.1 = 0.531 "
                          "(upper 95% bound 0.57); short by 0.291")
    assert res.short_by == pytest.approx(0.9 * 0.59 - 0.24) and res.bound_short_by == pytest.approx(0.9 * 0.6333 - 0.21)
    res = judge("student.worst@0.1 <= 0.2", table(vals))  # upper bound 0.27 against the constant: no bound on 0.2
    assert res.reason == "FAIL: student.worst@0.1 = 0.24 (upper 95% bound 0.27) > 0.2; short by 0.04"
    res = judge("student.worst@0.1 >= 0.2", table(vals))
    assert res.passed and res.reason == "PASS: student.worst@0.1 = 0.24 (lower 95% bound 0.21) >= 0.2"
    assert res.short_by is None and res.bound_short_by is None
    res = judge("student.worst@0.1 >= 0.5", table(vals), on="point")
    assert res.reason == "FAIL: student.worst@0.1 = 0.24 < 0.5 (point estimates); short by 0.26"
    # parentheses and operators as written; a constant expression shows its value
    res = judge("(student.worst@0.1 - 0.1) / 2 >= 1 - 1/2", table(vals), on="point")
    assert res.reason.startswith("FAIL: (student.worst@0.1 - 0.1) / 2 = 0.07 < 1 - 1 / 2 = 0.5 (point estimates)")


def test_radius_kept_as_written():
    """A radius comes back as the user wrote it in messages, and canonical decimals are not turned into k/255."""
    from robkd.types import format_radius

    vals = {"student.worst@0.2": (0.5, 0.45, 0.55)}
    res = judge("student.worst@2e-1 >= 0.6", table(vals))
    assert "student.worst@2e-1 = 0.5" in res.reason and set(res.references) == {"student.worst@0.2"}
    assert (format_radius(0.2), format_radius(8 / 255), format_radius(1.0), format_radius(0.05)) == ("0.2", "8/255", "1", "0.05")
    with pytest.raises(GateError, match=r"radius 0\.2 in"):
        validate_gate(parse_gate("student.worst@51/255 >= 0.5"), radii=RADII, attacks=ATTACKS, certified=False)


def test_paired_messages_and_samples_needed():
    import numpy as np

    rng = np.random.default_rng(1)
    t = (rng.random(200) < 0.6).astype(float)
    s = t.copy()
    s[np.flatnonzero(t)[:8]] = 0.0  # the student keeps 94.6% of the teacher's robust samples: >= 0.9 on points
    lookup, samples = _paired({"student.worst@0.1": s, "teacher.worst@0.1": t})
    res = judge("student.worst@0.1 >= 0.9*teacher.worst@0.1", lookup, samples=samples)
    assert not res.passed and res.short_by is None and res.bound_short_by > 0
    assert "on the point estimates, but it holds only on" in res.reason
    # the normal approximation of the bootstrap: at the returned n the margin is 1.645 standard errors
    d = s - 0.9 * t
    se_needed = d.mean() / 1.645
    assert res.samples_needed == pytest.approx(len(d) * (d.std() / math.sqrt(len(d)) / se_needed) ** 2, rel=0.25)
    assert f"about {res.samples_needed} samples would decide it" in res.reason
    # a paired failure on the point estimates states the shortfall
    res = judge("student.worst@0.1 >= teacher.worst@0.1", lookup, samples=samples)
    assert res.reason.startswith("FAIL: student.worst@0.1 = ") and res.reason.endswith(f"short by {8 / 200:.3g}")
    assert res.samples_needed is None
