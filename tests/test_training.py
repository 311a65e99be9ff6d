"""Training runs on a tiny real subset: loss goes down, resume is exact, DDP replicas agree,
bad input stops before training with a clear message."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import RESNET20, digest, tiny_config
from service_helpers import free_port

from training.cli import main as cli_main
from training.config import ConfigError
from training.detectors import DETECTORS
from training.trainer import Trainer, prepare


def test_a_few_greg_plus_steps_lower_the_loss(tiny_data, tmp_path):
    # The GReg+ configs' learning rate. At twice that, 20 steps of batch 8 did not reliably
    # lower this loss: whether they did depended on torch's thread count (the order of float
    # sums), i.e. on whether a service test had set it before this one ran. One thread
    # here, whatever the machine: the same sums everywhere (conftest restores the count).
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = tiny_config(tiny_data, tmp_path / "run", "optim.lr=0.005", "optim.schedule=constant",
                      "train.epochs=4", "train.max_steps_per_epoch=5")
    trainer = Trainer(prepare(cfg))
    id_batch, aux_batch = next(trainer.batches())

    def loss_on_fixed_batch() -> float:
        x_in, y = id_batch
        return float(trainer.loss_fn(trainer.model, x_in, y, aux_batch[0][:16]).total.detach())

    before = loss_on_fixed_batch()
    trainer.run()
    after = loss_on_fixed_batch()
    assert after < 0.8 * before, (before, after)


def test_resume_after_a_kill_gives_the_same_weights(tiny_data, tmp_path):
    args = ("train.epochs=2", "train.max_steps_per_epoch=4", "train.checkpoint_every=2")
    straight = Trainer(prepare(tiny_config(tiny_data, tmp_path / "a", *args)))
    straight.run()

    cfg = tiny_config(tiny_data, tmp_path / "b", *args)
    first = Trainer(prepare(cfg))
    first.run(stop_after_steps=6)  # "killed" after the checkpoint at epoch 2, step 2
    assert (first.run_dir / "checkpoint.pt").exists()
    del first

    resumed = Trainer(prepare(cfg))
    assert resumed.try_resume()
    assert (resumed.epoch, resumed.step) == (1, 2)
    resumed.run()
    assert digest(resumed.model.state_dict().items()) == digest(straight.model.state_dict().items())


def test_bf16_on_the_cpu_is_opt_in_and_keeps_float32_weights(tiny_data, tmp_path):
    assert prepare(tiny_config(tiny_data, tmp_path / "a")).runtime.amp_dtype is None  # auto
    cfg = tiny_config(tiny_data, tmp_path / "b", "train.amp=bf16", "train.epochs=1",
                      "train.max_steps_per_epoch=2")
    trainer = Trainer(prepare(cfg))
    assert trainer.rt.amp_dtype == torch.bfloat16
    with trainer.rt.autocast():
        assert trainer.model(torch.randn(2, 3, 32, 32)).dtype == torch.bfloat16
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()  # GReg+: the gradient penalty's double backward runs under autocast too
    after = trainer.model.state_dict()
    floats = [k for k, v in after.items() if v.is_floating_point()]
    assert all(after[k].dtype == before[k].dtype == torch.float32 for k in floats)
    assert all(torch.isfinite(after[k]).all() for k in floats)
    assert any(not torch.equal(after[k], before[k]) for k in floats)


def test_resume_refuses_a_checkpoint_of_another_config(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "c", "train.epochs=1", "train.max_steps_per_epoch=1")
    trainer = Trainer(prepare(cfg))
    trainer.run()
    other = Trainer(prepare(tiny_config(tiny_data, tmp_path / "c", "train.epochs=1",
                                        "train.max_steps_per_epoch=1", "optim.lr=0.5")))
    with pytest.raises(ConfigError, match="optim.lr"):
        other.try_resume()


@pytest.mark.parametrize("mode,resumes", [("ce", True), ("energy", False)])
def test_a_checkpoint_from_before_the_outlier_split_resumes_only_in_ce(tiny_data, tmp_path,
                                                                       mode, resumes):
    args = ("train.epochs=1", "train.max_steps_per_epoch=2", "train.checkpoint_every=1",
            f"loss.mode={mode}")
    trainer = Trainer(prepare(tiny_config(tiny_data, tmp_path / "c", *args)))
    trainer.run(stop_after_steps=1)
    state = torch.load(trainer.checkpoint_path, weights_only=True)
    del state["config"]["data"]["aux_val_fraction"]  # as written before the key existed
    torch.save(state, trainer.checkpoint_path)
    again = Trainer(prepare(tiny_config(tiny_data, tmp_path / "c", *args)))
    if resumes:
        assert again.try_resume() and again.step == 1
    else:
        with pytest.raises(ConfigError, match="data.aux_val_fraction"):
            again.try_resume()


def _ddp_worker(rank: int, world: int, port: int, cfg_json: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from training.config import RunConfig

    cfg = RunConfig.model_validate_json(cfg_json)
    trainer = Trainer(prepare(cfg))
    first_batch = next(trainer.batches())[0][1].tolist()
    trainer.run(stop_after_steps=3)
    # Parameters, not buffers: BatchNorm running statistics are per process until DDP
    # broadcasts rank 0's at the next forward pass.
    params = digest(trainer.model.named_parameters())
    Path(out, f"{rank}.txt").write_text(f"{params}\n{first_batch}")
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_keep_identical_replicas(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "ddp", "train.epochs=1", "train.max_steps_per_epoch=3",
                      "optim.lr=0.05")
    mp.spawn(_ddp_worker, args=(2, free_port(), cfg.model_dump_json(), str(tmp_path)), nprocs=2)
    digest0, batch0 = (tmp_path / "0.txt").read_text().split("\n")
    digest1, batch1 = (tmp_path / "1.txt").read_text().split("\n")
    assert digest0 == digest1  # gradients were averaged: replicas identical
    assert batch0 != batch1  # ...while each process trained on its own shard
    # and the replicas did move away from the pretrained starting point
    single = Trainer(prepare(cfg))
    assert digest(single.model.named_parameters()) != digest0


def write_config(tmp_path, tiny_data) -> Path:
    """The default model's config on the tiny data; it starts from the shipped checkpoint
    (the default model starts from a stage-1 run that a fresh clone does not have)."""
    path = tmp_path / "cfg.yaml"
    path.write_text(f"base: {Path('configs/cifar10_resnet20_gregplus.yaml').resolve()}\n"
                    f"data: {{train: {tiny_data['id']}}}\n"
                    f"model: {{pretrained: {RESNET20}}}\n")
    return path


@pytest.mark.parametrize("override,message", [
    (["loss.lambda_gard=1"], "loss.lambda_gard: Extra inputs are not permitted"),
    (["optim.lr=-0.1"], "optim.lr: Input should be greater than 0"),
    (["data.train=/nonexistent/folder"], "dataset folder not found: /nonexistent/folder"),
    (["model.pretrained=../shared/checkpoints/resnet56-4bfd9763.th"],
     "resnet56-4bfd9763.th does not fit CifarResNet"),
])
def test_bad_input_stops_with_one_clear_message(tmp_path, tiny_data, capsys, override, message):
    cfg = write_config(tmp_path, tiny_data)
    code = cli_main(["train", "--config", str(cfg), f"run_dir={tmp_path / 'run'}",
                     f"data.cache_dir={tiny_data['cache']}", *override])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_empty_folder_and_unreadable_image_are_named(tmp_path, tiny_data, capsys):
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    bad = tmp_path / "bad"
    shutil.copytree(tiny_data["id"], bad)
    broken = bad / "cat" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    cfg = write_config(tmp_path, tiny_data)
    for source, message in ((empty, f"class folder {empty / 'cat'} holds no images"),
                            (bad, f"unreadable image {broken}")):
        code = cli_main(["train", "--config", str(cfg), f"run_dir={tmp_path / 'run'}",
                         f"data.cache_dir={tiny_data['cache']}", f"data.train={source}"])
        assert code == 2
        assert message in capsys.readouterr().err


def test_evaluate_reports_accuracy_and_detection_metrics(tmp_path, tiny_data, capsys):
    import json

    cfg = write_config(tmp_path, tiny_data)
    out = tmp_path / "report"
    code = cli_main(["evaluate", "--config", str(cfg), f"data.cache_dir={tiny_data['cache']}",
                     f"data.train={tiny_data['id']}", "--weights", str(RESNET20),
                     "--id", str(tiny_data["id"]), "--ood", "noise=synthetic:uniform:64",
                     "--ood", f"tin={tiny_data['aux']}", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert 0.6 < report["id_accuracy"] <= 1.0  # pretrained ResNet-20 on real CIFAR images
    assert report["selected_block"] == max(report["norm_ratios"], key=report["norm_ratios"].get)
    assert "| featurenorm_last (layer3.2) |" in (out / "report.md").read_text()
    assert {"plots/roc_noise.svg", "plots/blocks.svg",
            *(f"plots/hist_{d.name}.svg" for d in DETECTORS)} <= {
        str(p.relative_to(out)) for p in out.rglob("*.svg")}
    for name in ("noise", "tin"):
        assert set(report["ood"][name]) == {d.name for d in DETECTORS}
        for detector in ("msp", "max_logit", "energy", "featurenorm", "featurenorm_last"):
            m = report["ood"][name][detector]
            assert set(m) == {"fpr95", "fpr95_ood_positive", "auroc", "aupr_in", "aupr_out"}
            assert 0.0 <= m["fpr95"] <= 1.0 and 0.0 <= m["auroc"] <= 1.0
    code = cli_main(["evaluate", "--config", str(cfg), "--weights", str(RESNET20),
                     "--id", str(tiny_data["id"]), "--ood", "broken"])
    assert code == 2 and "NAME=SOURCE" in capsys.readouterr().err
