"""The distillation module: a frozen teacher at its own input size, a student that learns from it."""

import torch

from fedxr.distill.module import DistillClassifier
from fedxr.models.checkpoint import model_from_checkpoint, save_checkpoint
from fedxr.models.registry import build_model
from fedxr.preprocessing import Preprocessing


def _teacher_ckpt(tmp_path):
    torch.manual_seed(1)
    teacher = build_model("tiny_cnn")
    return save_checkpoint(tmp_path / "teacher.ckpt", model_name="tiny_cnn", state_dict=teacher.state_dict(),
                           preprocessing=Preprocessing(48), thresholds=[0.5] * 14), teacher


def test_teacher_frozen_and_loaded(tmp_path):
    path, teacher = _teacher_ckpt(tmp_path)
    m = DistillClassifier("tiny_cnn", "tiny_cnn", teacher_preprocessing=Preprocessing(48), teacher_checkpoint=str(path), preprocessing=Preprocessing(32))
    assert all(not p.requires_grad for p in m.teacher.parameters())
    m.train()
    assert m.training
    assert not m.teacher.training  # train() never wakes the teacher
    torch.testing.assert_close(m.teacher.state_dict()["head.weight"], teacher.state_dict()["head.weight"])
    assert any(k.startswith("teacher.") for k in m.state_dict())  # travels with the global model


def test_teacher_sees_its_own_size_and_normalisation(tmp_path):
    path, teacher = _teacher_ckpt(tmp_path)
    m = DistillClassifier("tiny_cnn", "tiny_cnn", teacher_preprocessing=Preprocessing(48, 0.4, 0.3),
                          teacher_checkpoint=str(path), preprocessing=Preprocessing(32, 0.5, 0.25))
    unit = torch.rand(2, 1, 32, 32)
    xt = m.teacher_input((unit - 0.5) / 0.25)
    assert xt.shape == (2, 1, 48, 48)
    back = xt * 0.3 + 0.4
    assert abs(float(back.mean()) - float(unit.mean())) < 0.02  # the same picture, re-normalised


def test_distillation_steps_change_only_the_student(tmp_path):
    path, _ = _teacher_ckpt(tmp_path)
    torch.manual_seed(0)
    m = DistillClassifier("tiny_cnn", "tiny_cnn", teacher_preprocessing=Preprocessing(48), teacher_checkpoint=str(path),
                          preprocessing=Preprocessing(32), alpha=1.0, temperature=2.0, lr=3e-3)
    x = torch.randn(16, 1, 32, 32)
    torch.rand(16, 14)  # the draw the earlier label tensor took: the seeded stream stays as it was
    teacher_before = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    opt = torch.optim.AdamW(m.model.parameters(), lr=3e-3)
    from fedxr.distill.losses import bernoulli_kd

    with torch.no_grad():
        kd_before = float(bernoulli_kd(m(x), m.teacher_logits(x), 2.0))
    m.train()
    for _ in range(40):
        opt.zero_grad()
        loss = bernoulli_kd(m(x), m.teacher_logits(x), 2.0)
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        kd_after = float(bernoulli_kd(m(x), m.teacher_logits(x), 2.0))
    assert kd_after < 0.5 * kd_before  # the student moves towards the teacher
    for k, v in m.teacher.state_dict().items():
        torch.testing.assert_close(v, teacher_before[k])  # the teacher does not move
    ckpt_path = m.save_fedxr_checkpoint(tmp_path / "student.ckpt")
    student, ckpt = model_from_checkpoint(ckpt_path)
    assert ckpt["model_name"] == "tiny_cnn"
    assert not any(k.startswith("teacher") for k in ckpt["state_dict"])


def test_trainer_logs_task_and_distillation_losses_separately(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    path, _ = _teacher_ckpt(tmp_path)
    m = DistillClassifier("tiny_cnn", "tiny_cnn", teacher_preprocessing=Preprocessing(48), teacher_checkpoint=str(path), preprocessing=Preprocessing(32))
    data = DataLoader(TensorDataset(torch.randn(32, 1, 32, 32), (torch.rand(32, 14) < 0.2).float()), batch_size=8)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(m, train_dataloaders=data)
    from fedxr.labels import TRAIN_KD_LOSS, TRAIN_TASK_LOSS

    metrics = trainer.callback_metrics
    assert {TRAIN_TASK_LOSS, TRAIN_KD_LOSS, "train_loss_epoch"} <= set(metrics)
    assert float(metrics[TRAIN_KD_LOSS]) > 0
    assert float(metrics[TRAIN_TASK_LOSS]) > 0


def test_students_do_not_inherit_the_teachers_fine_tuning_settings():
    """model.init_from, model.trainable and model.norm describe the teacher; a student trains all its weights from
    its own initialisation (a frozen random student, or the teacher's weights loaded into it, would be wrong)."""
    from fedxr.config import load_recipe
    from fedxr.distill.run import student_recipe

    from helpers import QUICKSTART

    recipe = load_recipe(QUICKSTART, ["model.trainable=head", "model.norm=group", "model.init_from=public.ckpt"])
    student = student_recipe(recipe, "resnet18_quarter").model
    assert (student.name, student.trainable, student.init_from, student.norm) == ("resnet18_quarter", "all", None, "auto")
