"""The audit result cache and identical models: a teacher audited once is taken from the cache by a later
audit (re-checked, same figures), every key change misses, broken or tampered entries are ignored and
recomputed, concurrent writers leave a valid entry, --no-cache neither reads nor writes, and a model
audited against itself is attacked once."""

from __future__ import annotations

import copy
import json
import struct
import threading

import pytest
import torch

from helpers import mlp, train_plain
from robkd.auditing import audit
from robkd.auditing import reuse as reuse_mod
from robkd.auditing.cache import HEADER, ResultCache, key_of

FAST = dict(data="fashion-mnist-slice", n=48, eps=[0.05, 0.1], attacks=["fgsm", "pgd-3"], batch_size=48, sanity_n=8)
#: what may differ between two computations of the same block
VOLATILE = ("timings", "cache")


@pytest.fixture(scope="module")
def students(fmnist_train):
    """Two new students (small MLPs, one epoch each)."""
    return [train_plain(mlp(seed, hidden=(24,)), fmnist_train, epochs=1, seed=seed) for seed in (3, 4)]


@pytest.fixture
def roles_run(monkeypatch):
    """The roles whose per-model stages (clean pass, attack suite) run, in order, and the models the attack
    suite is run on (Suite.run calls)."""
    from robkd.attacks.suite import Suite

    seen: dict[str, list] = {"roles": [], "suite_runs": []}
    real_model, real_run = reuse_mod.run_model, Suite.run

    def run_model(plan, role, *a, **k):
        seen["roles"].append(role)
        return real_model(plan, role, *a, **k)

    def run(self, model, *a, **k):
        seen["suite_runs"].append(model)
        return real_run(self, model, *a, **k)

    monkeypatch.setattr(reuse_mod, "run_model", run_model)
    monkeypatch.setattr(Suite, "run", run)
    return seen


def _block(d: dict, role: str) -> dict:
    b = {k: v for k, v in d[role].items() if k not in VOLATILE}
    b["model"] = {k: v for k, v in b["model"].items() if k != "role"}
    return b


def _same_figures(a, b, role_a: str = "teacher", role_b: str = "teacher") -> None:
    """Identical model blocks and per-sample tensors (adversarial examples included)."""
    assert _block(a.to_dict(), role_a) == _block(b.to_dict(), role_b)
    names = [k[len(role_a) + 1:] for k in a.tensors if k.startswith(role_a + ".")]
    assert names and "x_adv" in names
    for k in names:
        u, v = a.tensors[f"{role_a}.{k}"], b.tensors[f"{role_b}.{k}"]
        if u.dtype.is_floating_point:  # bit for bit, NaN where NaN (an unbroken sample's adversarial radius)
            assert u.dtype == v.dtype and torch.equal(u.isnan(), v.isnan()), k
            u, v = u[~u.isnan()], v[~v.isnan()]
        assert torch.equal(u, v), k


def test_a_second_audit_takes_the_teacher_from_the_cache(trained_mlp, students, tmp_path, roles_run):
    from robkd.report import render

    cache = tmp_path / "cache"
    first = audit(trained_mlp, students[0], cache=cache, **FAST)
    assert roles_run["roles"] == ["teacher", "student"] and len(roles_run["suite_runs"]) == 2
    rec1 = first.to_dict()["teacher"]["cache"]
    assert rec1["stored"] and not rec1["hit"] and rec1["created"] is None
    assert (cache / f"{rec1['key']}.safetensors").is_file()
    assert sorted(p.name.split(".", 1)[1] for p in cache.glob(f"{rec1['key']}.sanity-*.json"))  # its sanity checks too

    roles_run["roles"].clear(), roles_run["suite_runs"].clear()
    second = audit(trained_mlp, students[1], cache=cache, out_dir=tmp_path / "out", **FAST)
    assert roles_run["roles"] == ["student"] and len(roles_run["suite_runs"]) == 1  # the teacher is never attacked
    d = second.to_dict()
    assert d["teacher"]["cache"]["hit"] and d["teacher"]["cache"]["key"] == rec1["key"]
    assert d["teacher"]["cache"]["created"] and not d["teacher"]["cache"]["stored"]
    assert not d["student"]["cache"]["hit"] and d["student"]["cache"]["key"] != rec1["key"]
    _same_figures(first, second)
    teacher_flags = lambda r: [f for f in r.to_dict()["sanity"]["flags"] if f.get("model") == "teacher"]  # noqa: E731
    assert teacher_flags(first) == teacher_flags(second)
    # results.json says so, and the report too
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["teacher"]["cache"]["hit"] is True
    render(written, tmp_path / "out", formats=("md",))
    text = (tmp_path / "out" / "report.md").read_text()
    assert f"Teacher figures reused from cache (computed {d['teacher']['cache']['created']})" in text
    # another radius: another key, so both models are attacked (every setting of the key: the next test)
    roles_run["roles"].clear()
    third = audit(trained_mlp, students[1], cache=cache, **{**FAST, "eps": [0.05, 0.11]})
    assert roles_run["roles"] == ["teacher", "student"] and not third.to_dict()["teacher"]["cache"]["hit"]


def test_the_key_changes_with_everything_that_determines_a_block(trained_mlp):
    from robkd.auditing.config import AuditConfig
    from robkd.auditing.plan import make_plan
    from robkd.auditing.reuse import Reuse
    from robkd.models.wrapper import RobustModel

    base = dict(FAST, data="fashion-mnist-slice")

    def key(teacher=trained_mlp, **change):
        cfg = AuditConfig.from_spec(None, **{**base, **change})
        return Reuse.for_plan(make_plan(cfg, teacher, trained_mlp)).keys["teacher"]

    k0 = key()
    assert key() == k0 and key(gates=["student.clean >= 0.1"], sanity_n=0, strict=True) == k0  # not in the key
    changed = {
        "radii": key(eps=[0.05, 0.11]), "attacks": key(attacks=["fgsm", "pgd-4"]), "order": key(attacks=["pgd-3", "fgsm"]),
        "seed (the subset and the attacks)": key(seed=1), "subset": key(n=47), "batch": key(batch_size=16),
        "norm": key(norm="L2", eps=[0.5, 1.0]), "certify": key(certify="ibp"),
    }
    weights = copy.deepcopy(trained_mlp)
    with torch.no_grad():
        next(p for p in weights.parameters() if p.dim() == 1)[0] += 1e-3
    changed["weights"] = key(teacher=weights)
    # same weights (same model_sha256), another normalisation: a different model
    renorm = RobustModel(copy.deepcopy(trained_mlp.net), dataclasses_replace(trained_mlp.meta, mean=(0.3,)))
    from robkd.models.identity import model_sha256

    assert model_sha256(renorm) == model_sha256(trained_mlp)
    changed["normalisation"] = key(teacher=renorm)
    assert k0 not in changed.values() and len(set(changed.values())) == len(changed)


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(copy.deepcopy(obj), **kw)


def _edit_header(raw: bytes, edit) -> bytes:
    """The safetensors file ``raw`` with its JSON header (incl. our metadata) edited by ``edit(header_dict)``."""
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8 : 8 + n])
    meta = json.loads(head["__metadata__"][HEADER])
    edit(meta)
    head["__metadata__"][HEADER] = json.dumps(meta)
    new = json.dumps(head).encode()
    new += b" " * (-len(new) % 8)
    return struct.pack("<Q", len(new)) + new + raw[8 + n :]


def _tamper_adversarial(cache: ResultCache, key: str) -> None:
    """Rewrite the entry (with a valid checksum) so that one kept adversarial example is the clean sample, which
    the model classifies correctly: only the forward-pass re-check can see it."""
    from safetensors import safe_open

    with safe_open(str(cache.path(key)), framework="pt") as fh:
        header = json.loads(fh.metadata()[HEADER])
        t = {k: fh.get_tensor(k) for k in fh.keys()}
    from robkd.data import eval_subset, load_dataset

    x = eval_subset(load_dataset("fashion-mnist-slice", "test"), FAST["n"], 0).float_x()
    row = int(torch.isfinite(t["suite.adv_radius"]).nonzero()[0, 0])
    t["suite.x_adv"][row] = x[row]
    info = {k: v for k, v in header.items() if k not in ("format", "key", "material", "created", "tensors_sha256")}
    assert cache.store(key, header["material"], t, info) is not None


@pytest.mark.parametrize("damage", ["truncated", "edited header", "flipped bytes", "tampered adversarial"])
def test_a_broken_entry_is_ignored_and_recomputed(trained_mlp, students, tmp_path, roles_run, damage, caplog):
    cache_dir = tmp_path / "cache"
    first = audit(trained_mlp, students[0], cache=cache_dir, **FAST)
    key = first.to_dict()["teacher"]["cache"]["key"]
    cache = ResultCache(cache_dir)
    path = cache.path(key)
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "edited header":
        path.write_bytes(_edit_header(raw, lambda h: h["material"].__setitem__("seed", 1)))
    elif damage == "flipped bytes":  # one byte of the stored tensors: caught by their checksum
        path.write_bytes(raw[:-3] + bytes([raw[-3] ^ 1]) + raw[-2:])
    else:
        _tamper_adversarial(cache, key)
    roles_run["roles"].clear()
    with caplog.at_level("INFO", logger="robkd.auditing"):
        again = audit(trained_mlp, students[0], cache=cache_dir, **FAST)
    assert roles_run["roles"] == ["teacher"]  # the student's entry was whole: only the teacher is recomputed
    rec = again.to_dict()["teacher"]["cache"]
    assert not rec["hit"] and rec["stored"]
    assert "audit cache" in caplog.text and str(path) in caplog.text
    if damage == "tampered adversarial":
        assert "no longer fool the model" in caplog.text
    _same_figures(first, again)
    assert cache.load(key, json.loads(json.dumps(_material(cache, key)))) is not None  # stored anew, whole


def _material(cache: ResultCache, key: str) -> dict:
    from safetensors import safe_open

    with safe_open(str(cache.path(key)), framework="pt") as fh:
        return json.loads(fh.metadata()[HEADER])["material"]


def test_concurrent_writers_of_one_key_leave_a_valid_entry(tmp_path):
    cache = ResultCache(tmp_path / "c")
    material = {"what": "concurrency"}
    key = key_of(material)
    seen: list[str] = []
    stop = threading.Event()

    def writer(i: int) -> None:
        for _ in range(6):
            cache.store(key, material, {"a": torch.full((200_000,), float(i))}, {"writer": i})

    def reader() -> None:
        while not stop.is_set():
            got = cache.load(key, material)
            if got is None:
                seen.append("none")
                continue
            header, t = got
            seen.append("ok" if bool((t["a"] == float(header["writer"])).all()) else "mixed")

    writer(4)  # an entry exists: from now on a reader must always find a whole one
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    r = threading.Thread(target=reader)
    r.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    r.join()
    header, t = cache.load(key, material)
    assert bool((t["a"] == float(header["writer"])).all())
    assert seen and set(seen) == {"ok"}  # never missing, never a mix of two writers, never partial
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [f"{key}.safetensors"]  # no temporary file left


def test_no_cache_neither_reads_nor_writes(trained_mlp, students, tmp_path, monkeypatch, capsys):
    from robkd.cli.main import main
    from robkd.models import save_model

    t = str(save_model(trained_mlp, tmp_path / "t.safetensors"))
    s = str(save_model(students[0], tmp_path / "s.safetensors"))
    argv = ["audit", t, s, "--data", "fashion-mnist-slice", "--n", "48", "--eps", "0.05,0.1", "--attacks", "fgsm,pgd-3",
            "--sanity-n", "0", "--no-report"]
    monkeypatch.delenv("ROBKD_NO_CACHE", raising=False)
    monkeypatch.setenv("ROBKD_CACHE_DIR", str(tmp_path / "default"))

    def boom(*a, **k):
        raise AssertionError("the cache was used under --no-cache")

    with monkeypatch.context() as m:
        for name in ("load", "store", "load_json", "save_json", "prune"):
            m.setattr(ResultCache, name, boom)
        assert main([*argv, "--no-cache", "--out", str(tmp_path / "a")]) == 0
    d = json.loads((tmp_path / "a" / "results.json").read_text())
    assert d["config"]["cache"] is False and not (tmp_path / "default").exists()
    assert all(not d[r]["cache"]["hit"] and not d[r]["cache"]["stored"] for r in ("teacher", "student"))
    assert main([*argv, "--no-cache", "--cache", str(tmp_path / "x"), "--out", str(tmp_path / "b")]) == 2
    assert "not both" in capsys.readouterr().err and not (tmp_path / "x").exists()
    # without the flag: the default directory ($ROBKD_CACHE_DIR); --cache DIR: that directory
    assert main([*argv, "--out", str(tmp_path / "c")]) == 0
    assert len(list((tmp_path / "default").glob("*.safetensors"))) == 2
    assert main([*argv, "--cache", str(tmp_path / "mine"), "--out", str(tmp_path / "d")]) == 0
    d = json.loads((tmp_path / "d" / "results.json").read_text())
    assert not d["teacher"]["cache"]["hit"] and len(list((tmp_path / "mine").glob("*.safetensors"))) == 2


def test_a_model_audited_against_itself_is_attacked_once(trained_mlp, students, tmp_path, roles_run):
    reference = audit(trained_mlp, students[0], cache=False, **FAST)  # the teacher's figures, computed alone
    roles_run["roles"].clear(), roles_run["suite_runs"].clear()
    twin = copy.deepcopy(trained_mlp)  # another object (as from another file), same weights
    result = audit(trained_mlp, twin, cache=False, out_dir=tmp_path / "out", **FAST)
    assert roles_run["roles"] == ["teacher"] and len(roles_run["suite_runs"]) == 1
    d = result.to_dict()
    assert d["student"]["cache"]["same_as"] == "teacher" and d["teacher"]["cache"]["same_as"] is None
    assert d["student"]["cache"]["key"] == d["teacher"]["cache"]["key"]
    _same_figures(reference, result, "teacher", "student")
    _same_figures(reference, result, "teacher", "teacher")
    assert all(r["student_robust"] == r["teacher_robust"] == r["both_robust"] for r in d["transfer"])
    flags = d["sanity"]["flags"]
    as_teacher = [{**f, "model": "teacher"} for f in flags if f.get("model") == "student"]
    assert as_teacher == [f for f in flags if f.get("model") == "teacher"]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["student"]["cache"]["same_as"] == "teacher"


def test_certification_is_cached_and_shared_by_identical_models(trained_mlp, students, tmp_path, roles_run):
    cert = dict(FAST, certify="ibp", linear_region_radius=True, sanity_n=0, n=24)
    first = audit(trained_mlp, students[0], cache=tmp_path / "c", **cert)
    roles_run["roles"].clear()
    again = audit(trained_mlp, copy.deepcopy(trained_mlp), cache=tmp_path / "c", out_dir=tmp_path / "out", **cert)
    assert roles_run["roles"] == []  # the teacher from the cache, the student is the teacher
    d = again.to_dict()
    assert d["teacher"]["cache"]["hit"] and d["student"]["cache"]["same_as"] == "teacher" and d["student"]["cache"]["hit"]
    assert d["teacher"]["certification"]["status"] == "ok" and "linear_region_radius" in d["teacher"]["certification"]
    _same_figures(first, again, "teacher", "teacher")
    _same_figures(first, again, "teacher", "student")
    assert "teacher.certified" in again.tensors and "student.linear_region_radius" in again.tensors


def test_the_cache_command_shows_and_clears(tmp_path, capsys):
    from robkd.cli.main import main

    cache = ResultCache(tmp_path / "c")
    for i in range(3):
        material = {"entry": i}
        cache.store(key_of(material), material, {"a": torch.zeros(10)}, {})
    assert main(["cache", "--dir", str(tmp_path / "c"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["entries"] == 3 and info["bytes"] > 0 and info["dir"] == str(tmp_path / "c")
    assert main(["cache", "--dir", str(tmp_path / "c"), "--clear"]) == 0
    assert "removed 3 entries" in capsys.readouterr().out and not list((tmp_path / "c").iterdir())


def test_the_cache_is_bounded(tmp_path, monkeypatch):
    import os

    cache = ResultCache(tmp_path / "c")
    keys = []
    for i in range(6):
        material = {"entry": i}
        keys.append(key_of(material))
        cache.store(keys[-1], material, {"a": torch.full((1000,), float(i))}, {})
        os.utime(cache.path(keys[-1]), (1_000_000 + i, 1_000_000 + i))  # used in this order
    size = cache.path(keys[0]).stat().st_size
    assert cache.prune(3 * size) == 3 and {e["key"] for e in cache.entries()} == set(keys[3:])
    # a write prunes down to ROBKD_CACHE_MAX_MB, never removing the entry it wrote
    monkeypatch.setenv("ROBKD_CACHE_MAX_MB", str(size / 2**20))
    cache.store(keys[0], {"entry": 0}, {"a": torch.full((1000,), 0.0)}, {})
    assert [e["key"] for e in cache.entries()] == [keys[0]]


def test_dry_run_counts_cached_and_identical_models_as_reused(trained_mlp, students, tmp_path, capsys):
    """--dry-run estimates a cached model as its re-check (two forward passes per sample) and the second of
    two identical models as free; it reads the cache and writes nothing to it."""
    from robkd.cli.main import main
    from robkd.models import save_model

    t = str(save_model(trained_mlp, tmp_path / "t.safetensors"))
    s = str(save_model(students[0], tmp_path / "s.safetensors"))
    cache = tmp_path / "cache"
    argv = ["--data", "fashion-mnist-slice", "--n", "48", "--eps", "0.05,0.1", "--attacks", "fgsm,pgd-3",
            "--sanity-n", "0", "--cache", str(cache), "--dry-run", "--json"]

    def phases(pair: list[str]) -> dict[tuple[str, str], dict]:
        assert main(["audit", *pair, *argv]) == 0
        return {(p["model"], p["phase"]): p for p in json.loads(capsys.readouterr().out)["phases"]}

    first = phases([t, s])
    assert (("teacher", "fgsm eps=0.05") in first and ("student", "fgsm eps=0.05") in first
            and not cache.exists())  # nothing cached yet, and the dry run stored nothing
    same = phases([t, t])
    assert same[("student", "same as the teacher: attacked once")]["passes"] == 0
    assert ("student", "clean predictions") not in same and ("teacher", "clean predictions") in same
    assert main(["audit", t, s, *argv[:-2], "--no-report", "--out", str(tmp_path / "o")]) == 0
    capsys.readouterr()
    cached = phases([t, s])
    for role in ("teacher", "student"):
        assert cached[(role, "from the cache (re-check of its clean and adversarial predictions)")]["passes"] == 2 * 48
        assert (role, "fgsm eps=0.05") not in cached
