"""Memory flat in n: the kept adversarial examples stream to a file (robkd.utils.spill), the samples file is
written chunk by chunk, and neither changes a bit of what an audit writes or how it resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from robkd.attacks import Suite, SuiteResult
from robkd.auditing import audit
from robkd.utils import spill

pytestmark = pytest.mark.skipif(not spill.spill_supported(), reason="spilling needs Linux")

FAST = dict(data="fashion-mnist-slice", n=40, eps=[0.02, 0.05], attacks=["fgsm", "pgd-3"], batch_size=16)


class _Interrupt(Exception):
    pass


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, dtypes and shapes (NaN equal to NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))


def _in_memory(monkeypatch) -> None:
    """Audits in this test keep x_adv in memory, as before spilling existed."""
    import robkd.attacks.suite_result as sr

    monkeypatch.setattr(sr, "spill_supported", lambda: False)


def test_write_safetensors_is_byte_identical_to_safetensors_save(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = spill.spill_empty((7, 1, 3, 3), torch.float32)
    x[:] = torch.rand(7, 1, 3, 3, generator=g)
    tensors = {"b.x_adv": x, "a": torch.tensor([True, False]), "c": torch.arange(5), "d": torch.rand(2, dtype=torch.float64),
               "empty": torch.zeros(0, 3), "h": torch.rand(3).half(), "k": torch.arange(4, dtype=torch.uint8),
               "i8": torch.arange(3, dtype=torch.int8), "r": torch.tensor(2.5)}
    for meta in ({"schema_version": "9"}, None):
        spill.write_safetensors(tmp_path / "s.safetensors", tensors, meta)
        assert (tmp_path / "s.safetensors").read_bytes() == save(tensors, metadata=meta)
    assert spill.is_spilled(x) and spill.is_spilled(x[2:]) and not spill.is_spilled(x.clone())


def test_spilled_suite_equals_in_memory_suite_and_round_trips_its_state(trained_cnn, fmnist_test, tmp_path: Path) -> None:
    x, y = fmnist_test.float_x()[:30], fmnist_test.y[:30]
    suite = Suite(["fgsm", "pgd-3"], "Linf", batch_size=8, progress=False)
    ref = suite.run(trained_cnn, x, y, [0.02, 0.05])
    got = suite.run(trained_cnn, x, y, [0.02, 0.05], spill=tmp_path / "adv.bin")
    assert not spill.is_spilled(ref.x_adv) and spill.is_spilled(got.x_adv)
    assert torch.isfinite(got.adv_radius).any()  # some samples broken: their rows were written to the file
    for k, v in ref.to_tensors().items():
        if k != "meta_json":  # holds the seconds each attack took
            assert _same(got.to_tensors()[k], v), k
    state = got.to_tensors(external_adv=True)
    assert "x_adv" not in state  # the state names the file instead of copying it
    back = SuiteResult.from_tensors(state, adv_dir=tmp_path)
    assert torch.equal(back.x_adv, ref.x_adv) and spill.is_spilled(back.x_adv)
    rows = torch.tensor([3, 0, 7])
    assert torch.equal(back.adv_rows(rows), ref.x_adv[rows])
    with pytest.raises(Exception, match="x_adv"):
        SuiteResult.from_tensors(state)  # the file's directory is needed
    (tmp_path / "adv.bin").write_bytes(b"short")
    with pytest.raises(Exception, match="corrupt suite state"):
        SuiteResult.from_tensors(state, adv_dir=tmp_path)


def test_samples_file_identical_streamed_and_in_memory(trained_cnn, trained_mlp, tmp_path: Path, monkeypatch) -> None:
    streamed = audit(trained_cnn, trained_mlp, out_dir=tmp_path / "s", **FAST)
    assert spill.is_spilled(streamed.tensors["teacher.x_adv"])
    assert (tmp_path / "s" / "state" / "suite-teacher.xadv").is_file()
    with monkeypatch.context() as m:
        _in_memory(m)
        plain = audit(trained_cnn, trained_mlp, out_dir=tmp_path / "m", **FAST)
    assert not spill.is_spilled(plain.tensors["teacher.x_adv"])
    a, b = (tmp_path / "s" / "samples.safetensors").read_bytes(), (tmp_path / "m" / "samples.safetensors").read_bytes()
    assert a == b
    t = load_file(str(tmp_path / "s" / "samples.safetensors"))
    assert t["student.x_adv"].dtype == torch.float32 and t["student.x_adv"].shape == (40, 1, 28, 28)
    assert torch.isfinite(t["student.adv_radius"]).any()  # broken samples: rows that came through the file
    # without --out the examples live in an anonymous file and the result is the same
    free = audit(trained_cnn, trained_mlp, **FAST)
    for k, v in t.items():
        assert _same(free.tensors[k].cpu(), v), k


def test_resume_after_a_kill_inside_a_pair_gives_the_uninterrupted_samples(trained_cnn, trained_mlp, tmp_path: Path) -> None:
    ref = audit(trained_cnn, trained_mlp, out_dir=tmp_path / "ref", **FAST)
    out = tmp_path / "r"
    saved = {"pairs": 0}

    def stop_in_student(kind, info):  # killed inside the student's second (attack, radius) pair
        if info.get("model") == "student" and kind == "checkpoint" and info.get("stage") == "attacks":
            saved["pairs"] += 1
        elif info.get("model") == "student" and kind == "progress" and saved["pairs"] >= 1:
            raise _Interrupt()

    with pytest.raises(_Interrupt):
        audit(trained_cnn, trained_mlp, out_dir=out, on_event=stop_in_student, **FAST)
    state = out / "state"
    partial = SuiteResult.from_tensors(load_file(str(state / "suite-student.safetensors")), adv_dir=state)
    assert 1 <= len(partial.done) < 4
    # a kill inside a pair can leave rows its saved state does not count: scribble on the never-broken rows
    unbroken = (~torch.isfinite(partial.adv_radius)).nonzero().flatten().tolist()
    assert unbroken
    row = 28 * 28 * 4
    with open(state / "suite-student.xadv", "r+b") as fh:
        for i in unbroken:
            fh.seek(i * row)
            fh.write(b"\x7f" * row)
    del partial
    res = audit(trained_cnn, trained_mlp, out_dir=out, resume=True, **FAST)
    assert any(r.startswith("student:") for r in res.to_dict()["resumed"])
    got, want = load_file(str(out / "samples.safetensors")), load_file(str(tmp_path / "ref" / "samples.safetensors"))
    assert set(got) == set(want)
    for k in want:
        assert _same(got[k], want[k]), k
