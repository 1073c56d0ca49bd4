"""Training on CUDA against the same run on the CPU (skipped without CUDA; run by scripts/gpu_check_training.sh).

Same seed on both devices: the same batches, augmentation and attack random starts
(drawn on the CPU), losses within 1e-3 relative, checkpoints that load on the CPU,
and a state saved on CUDA that resumes on the CPU (and back).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from robkd.data import eval_subset, train_val_split
from robkd.distill import TrainConfig, Trainer, load_train_state
from robkd.models import load_model

from helpers import mlp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU = "cuda"
GPU_TYPE = torch.device(GPU).type
REL = 1e-3
# a few steps of each method: 128 samples in batches of 32, two passes (fast-ard: 2 passes of 2 replays)
RUNS = {
    "kdiga": {},
    "ard": {"alpha": 0.8},
    "trades": {"augment": "crop-flip"},
    "fast-ard": {"replays": 2, "epochs": 4},
}
BASE = dict(epochs=2, batch_size=32, lr=0.05, steps=3, val_n=32, val_steps=2, select="last")


@pytest.fixture(autouse=True)
def _full_fp32():
    """No TF32 (on by default for cuDNN convolutions): CPU and GPU then agree to float32 rounding."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def split(fmnist_train):
    tr, va = train_val_split(fmnist_train, 0.1, seed=0)
    return eval_subset(tr, 128, seed=0), eval_subset(va, 64, seed=0)


@pytest.fixture(scope="module")
def teacher(split):
    """A small teacher trained on the CPU (each run below gets its own copy: the trainer moves it in place)."""
    t = mlp(5, hidden=(48,))
    Trainer(t, TrainConfig(method="st", epochs=2, batch_size=32, lr=0.05, val_n=0, select="last"), split[0], None,
            show_progress=False).fit()
    return t


def _trainer(method: str, device: str, split, teacher, state_path=None, seed_model: int = 1, **extra) -> Trainer:
    tr, va = split
    cfg = TrainConfig(method=method, device=device, **{**BASE, **RUNS[method], **extra})
    t = copy.deepcopy(teacher) if cfg.uses_teacher else None
    return Trainer(mlp(seed_model), cfg, tr, va, t, dataset="fashion-mnist", default_eps=0.1, state_path=state_path,
                   show_progress=False)


def _losses(records: list[dict]) -> list[dict[str, float]]:
    skip = {"epoch", "lr", "steps", "train_seconds", "images_per_s", "val_clean", "val_robust"}
    return [{k: v for k, v in r.items() if k not in skip} for r in records]


def _assert_close_losses(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(_losses(a), _losses(b)):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert math.isclose(ra[k], rb[k], rel_tol=REL, abs_tol=1e-6), (k, ra[k], rb[k])
    for ra, rb in zip(a, b):  # the same epochs, steps and learning rates
        assert (ra["epoch"], ra["steps"], ra["lr"]) == (rb["epoch"], rb["steps"], rb["lr"])


def _cpu_tensors(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.device.type == "cpu"
    if isinstance(obj, dict):
        return all(_cpu_tensors(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_cpu_tensors(v) for v in obj)
    return True


@pytest.mark.parametrize("method", list(RUNS))
def test_cuda_matches_cpu(tmp_path, split, teacher, method):
    cpu = _trainer(method, "cpu", split, teacher, tmp_path / "cpu.pt")
    log_cpu = cpu.fit()
    gpu = _trainer(method, GPU, split, teacher, tmp_path / "gpu.pt")
    log_gpu = gpu.fit()
    assert log_cpu.finished and log_gpu.finished
    assert gpu.device.type == GPU_TYPE and next(gpu.student.parameters()).device.type == GPU_TYPE
    if gpu.teacher is not None:
        assert next(gpu.teacher.parameters()).device.type == GPU_TYPE
    _assert_close_losses(log_cpu.records, log_gpu.records)
    assert all("val_robust" in r for r in log_gpu.records)
    # the same batches, augmentation and attack starts: the CPU generators made exactly the same draws
    s_cpu, s_gpu = load_train_state(tmp_path / "cpu.pt"), load_train_state(tmp_path / "gpu.pt")
    assert torch.equal(s_cpu["rng"]["data"], s_gpu["rng"]["data"])
    assert torch.equal(s_cpu["rng"]["attack"], s_gpu["rng"]["attack"])
    assert json.loads(s_gpu["config"])["device"] == GPU
    # the CUDA run's checkpoint is all CPU tensors, even without map_location, and loads into a CPU model
    raw = torch.load(tmp_path / "gpu.pt", weights_only=True)
    assert _cpu_tensors(raw["model"]) and _cpu_tensors(raw["optimizer"]) and _cpu_tensors(raw["delta"])
    m = mlp(3)
    m.load_state_dict(raw["model"])
    x = split[1].float_x(slice(0, 16))
    torch.testing.assert_close(m.eval()(x), gpu.student.eval()(x.to(GPU)).cpu(), rtol=1e-4, atol=1e-5)
    # and the trained weights agree with the CPU run's to float32 rounding after a few steps
    for (k, v), w in zip(cpu.student.state_dict().items(), gpu.student.state_dict().values()):
        torch.testing.assert_close(w.cpu(), v, rtol=1e-2, atol=1e-2, msg=k)


@pytest.mark.parametrize("method", ["kdiga", "ard", "fast-ard"])
def test_cuda_state_resumes_on_cpu_and_back(tmp_path, split, teacher, method):
    ref = _trainer(method, "cpu", split, teacher, tmp_path / "ref.pt")
    log_ref = ref.fit()
    # stopped on CUDA mid-epoch, continued on the CPU, stopped again, finished on CUDA
    path = tmp_path / "s.pt"
    part = _trainer(method, GPU, split, teacher, path).fit(max_steps=3)
    assert not part.finished
    st = load_train_state(path)  # map_location="cpu"
    assert st["step"] == 3 and _cpu_tensors(st)
    if method == "fast-ard":
        assert st["delta"].numel() > 0  # the carried perturbation travels with the state
    on_cpu = _trainer(method, "cpu", split, teacher, path, seed_model=77).fit(resume=True, max_steps=2)
    assert not on_cpu.finished
    last = _trainer(method, GPU, split, teacher, path, seed_model=78)
    log = last.fit(resume=True)
    assert log.finished and next(last.student.parameters()).device.type == GPU_TYPE
    _assert_close_losses(log_ref.records, log.records)
    s_ref, s = load_train_state(tmp_path / "ref.pt"), load_train_state(path)
    assert s["finished"] and torch.equal(s_ref["rng"]["data"], s["rng"]["data"])
    assert torch.equal(s_ref["rng"]["attack"], s["rng"]["attack"])
    # a finished CUDA state "resumes" on the CPU to the final model
    done = _trainer(method, "cpu", split, teacher, path, seed_model=79)
    assert done.fit(resume=True).finished
    for k, v in done.student.state_dict().items():
        assert torch.equal(v, last.student.state_dict()[k].cpu()), k


def test_python_api_on_cuda_saves_a_cpu_checkpoint(tmp_path):
    from robkd.distill import train

    kw = dict(arch_kwargs={"hidden": [16]}, train_n=64, batch_size=32, val_n=32, val_steps=2, steps=2, show_progress=False)
    model, log = train("at", "robkd:mlp", "fashion-mnist-slice", 1, tmp_path / "m.pt", device=GPU, **kw)
    assert log.finished and next(model.parameters()).device.type == GPU_TYPE
    loaded = load_model(tmp_path / "m.pt")
    assert next(loaded.parameters()).device.type == "cpu"
    assert loaded.meta.provenance["device"] == GPU_TYPE and loaded.meta.provenance["hyperparameters"]["device"] == GPU
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model.eval()(x.to(GPU)).cpu(), rtol=1e-4, atol=1e-5)
    ref, ref_log = train("at", "robkd:mlp", "fashion-mnist-slice", 1, tmp_path / "c.pt", device="cpu", **kw)
    _assert_close_losses(ref_log.records, log.records)


def test_repair_audits_on_the_training_device(tmp_path, teacher):
    from robkd.distill import repair

    t = copy.deepcopy(teacher)
    res = repair(t, student_arch="robkd:mlp", arch_kwargs={"hidden": [16]}, method="kdiga", data="fashion-mnist-slice",
                 epochs=1, out=tmp_path / "r.pt", train_n=64, batch_size=32, val_n=0, select="last", device=GPU,
                 show_progress=False, audit=True, audit_kwargs={"n": 32, "eps": [0.05], "attacks": ["fgsm"]})
    assert res.log.finished and res.audit is not None
    assert res.audit.to_dict()["config"]["device"].startswith(GPU_TYPE)
    assert load_model(tmp_path / "r.pt").meta.provenance["device"] == GPU_TYPE
