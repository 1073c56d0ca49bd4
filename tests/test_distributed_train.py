"""DDP training with 2 gloo processes (torch.multiprocessing spawn) equals one process with the same global batch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from robkd.distributed.launch import free_port

# KDIGA with a strong IGA term (double backprop); 31-sample global batches split 16/15 across 2 ranks,
# and a short last batch (8 = 4/4): the loss scaling must make the averaged gradient the global mean
CFG = dict(method="kdiga", epochs=1, batch_size=31, lr=0.05, lambda_iga=20.0, val_n=0, select="last",
           augment="crop-flip", cache_teacher=False, seed=0, schedule="constant")
TRAIN_N = 70


def _data():
    from robkd.data import eval_subset, load_dataset

    return eval_subset(load_dataset("fashion-mnist-slice", "train"), TRAIN_N, seed=0)


def _student():
    from robkd.models import build_model

    torch.manual_seed(123)
    return build_model("robkd:mlp", input_shape=(1, 28, 28), num_classes=10, dataset="fashion-mnist",
                       arch_kwargs={"hidden": [32]})


def _train(teacher_path: str, cfg: dict, state_path: str | None = None, *, max_steps: int | None = None,
           resume: bool = False, log_path: str | None = None):
    from robkd.distill import Trainer
    from robkd.distill.config import TrainConfig
    from robkd.models import load_model

    student = _student()
    teacher = load_model(teacher_path)
    trainer = Trainer(student, TrainConfig.from_dict(cfg), _data(), None, teacher, dataset="fashion-mnist",
                      state_path=state_path, log_path=log_path, show_progress=False)
    tlog = trainer.fit(resume=resume, max_steps=max_steps)
    return student, tlog


def _worker(rank: int, world: int, port: int, teacher_path: str, out_dir: str, cfg: dict, max_steps: int | None,
            refusals: bool) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from robkd.distributed import shutdown
    from robkd.errors import UsageError

    out = Path(out_dir)
    student, tlog = _train(teacher_path, cfg, str(out / "state.pt"), max_steps=max_steps, log_path=str(out / "log.jsonl"))
    torch.save({k: v.clone() for k, v in student.state_dict().items()}, out / f"weights{rank}.pt")
    (out / f"tlog{rank}.json").write_text(json.dumps(tlog.to_dict()))
    if refusals:  # what does not split across processes is refused, on every rank, before any collective
        messages = []
        for bad in ({"iga_form": "reference"}, {"method": "fast-ard", "eps": 0.1}, {"batch_size": 1}):
            try:
                _train(teacher_path, {**cfg, **bad})
                messages.append(None)
            except UsageError as exc:
                messages.append(str(exc))
        (out / f"refusals{rank}.json").write_text(json.dumps(messages))
    shutdown()


def _spawn(teacher_path: Path, out: Path, cfg: dict, max_steps: int | None = None, refusals: bool = False) -> None:
    mp.spawn(_worker, args=(2, free_port(), str(teacher_path), str(out), cfg, max_steps, refusals), nprocs=2, join=True)


def _close(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory, trained_mlp):
    from robkd.models import save_model

    p = tmp_path_factory.mktemp("ddp") / "teacher.safetensors"
    save_model(trained_mlp, p)
    return p


def test_ddp_kdiga_matches_single_process(teacher_path, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "ddp"
    out.mkdir()
    _spawn(teacher_path, out, CFG, refusals=True)
    w0 = torch.load(out / "weights0.pt", weights_only=True)
    w1 = torch.load(out / "weights1.pt", weights_only=True)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # the replicas stay identical
    single, slog = _train(str(teacher_path), CFG)
    ref = single.state_dict()
    init = _student().state_dict()
    assert not _close(ref, init)  # training moved the weights...
    assert _close(w0, ref)  # ...and 2 processes moved them exactly as one process did
    # the logged epoch averages are the global ones; only rank 0 wrote the log and the checkpoint
    r0 = json.loads((out / "tlog0.json").read_text())["records"][0]
    s0 = slog.records[0]
    for k in ("ce", "kl", "iga"):
        assert r0[k] == pytest.approx(s0[k], rel=1e-4)
    assert s0["iga"] > 0.01  # the double-backprop term is in play
    assert len((out / "log.jsonl").read_text().splitlines()) == 1
    for rank in (0, 1):
        ref_form, fast_ard, tiny = json.loads((out / f"refusals{rank}.json").read_text())
        assert "per-sample" in ref_form and "fast-ard" in fast_ard and "smaller than the 2 processes" in tiny


def test_ddp_checkpoint_resumes_in_one_process(teacher_path, tmp_path):
    torch.set_num_threads(1)
    cfg = {**CFG, "epochs": 2}
    out = tmp_path / "ddp"
    out.mkdir()
    _spawn(teacher_path, out, cfg, max_steps=4)  # stops inside the second epoch, rank 0 checkpoints
    assert (out / "state.pt").is_file() and sorted(p.name for p in out.glob("state*")) == ["state.pt"]
    student, tlog = _train(str(teacher_path), cfg, str(out / "state.pt"), resume=True)  # world size 1 now
    assert tlog.finished and tlog.global_step == 6
    ref, rlog = _train(str(teacher_path), cfg)
    assert _close(student.state_dict(), ref.state_dict())
    assert tlog.records[1]["iga"] == pytest.approx(rlog.records[1]["iga"], rel=1e-4)


def test_torchrun_repair_cli_trains_and_audits(teacher_path, tmp_path):
    """``torchrun -m robkd repair``: DDP training, rank 0 saves the model, the audit afterwards is sharded."""
    import subprocess
    import sys

    from robkd.distributed.launch import torchrun_command
    from robkd.models import load_model

    out = tmp_path / "student.safetensors"
    argv = ["repair", str(teacher_path), "--student-arch", "robkd:mlp", "--arch-kwargs", '{"hidden": [16]}',
            "--method", "kdiga", "--epochs", "1", "--batch-size", "64", "--train-n", "128", "--val-n", "32",
            "--data", "fashion-mnist-slice", "--out", str(out), "--log-file", str(tmp_path / "train.jsonl"),
            "--audit-n", "40", "--audit-eps", "0.05", "--audit-attacks", "fgsm"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROBKD_NO_PROGRESS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(torchrun_command(argv, 2, port=free_port()), env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    model = load_model(out)
    assert model.meta.provenance["world_size"] == 2 and model.meta.provenance["method"] == "kdiga"
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 1
    res = json.loads((tmp_path / "student.safetensors.audit" / "results.json").read_text())
    assert res["distributed"]["world_size"] == 2 and res["data"]["n"] == 40
    assert (tmp_path / "student.safetensors.audit" / "training_log.json").is_file()
    assert proc.stderr.count("saved ") <= 1  # rank 1 logs warnings only


def test_ddp_adversarial_distillation_matches_single_process(teacher_path, tmp_path):
    """ARD (PGD on the student) under DDP: each rank attacks its rows from the random starts one process draws for them (the
    global batch's noise, sliced), so 2 processes train like one and the ranks' starts differ."""
    torch.set_num_threads(1)
    cfg = {**CFG, "method": "ard", "eps": 0.1, "steps": 2, "step_size": 0.05, "temperature": 2.0}
    out = tmp_path / "ddp_ard"
    out.mkdir()
    _spawn(teacher_path, out, cfg)
    w0 = torch.load(out / "weights0.pt", weights_only=True)
    single, _ = _train(str(teacher_path), cfg)
    assert not _close(single.state_dict(), _student().state_dict())
    assert _close(w0, single.state_dict())
