"""DLD's teacher pass: eval mode, no grad, and the teacher's state untouched (training flags,
BatchNorm statistics), for the model's own full-depth pass ("self") and an external teacher."""
import copy

import pytest
import torch
from torch import nn

from dynenc import methods
from dynenc.asr import distillation_kl
from dynenc.methods import dld
from toy_ctc import tiny_model, toy_batch

TEACHERS = [pytest.param("self", id="self"), pytest.param("external", id="external")]


def make_objective(kind, model, **options):
    """A DLDObjective whose teacher is ``model`` itself or a separate model like it, in
    training mode when called (as after a parent module's ``train()``), whatever it was when given."""
    if kind == "self":
        return methods.DLDObjective("self", **options)
    teacher = tiny_model(seed=2, dropout=model.config.dropout)
    objective = methods.DLDObjective(teacher, **options)
    teacher.train()
    return objective


def teacher_of(objective, model):
    return model if objective.teacher == "self" else objective.teacher


def mix_training_flags(model):
    """Training mode for most submodules, eval for every third: flags a plain ``train()`` would not restore."""
    for index, module in enumerate(model.modules()):
        module.training = index % 3 != 0


def flags(model):
    return [module.training for module in model.modules()]


def batch_norm_state(model):
    return {name: value.clone() for name, value in model.named_buffers()
            if name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}


@pytest.mark.parametrize("kind", TEACHERS)
def test_kd_is_zero_when_the_student_computes_what_the_teacher_does(kind):
    # Nothing dropped, no dropout, BatchNorm on its running statistics: the training-mode
    # student is the eval-mode full-depth pass.
    model = tiny_model(seed=1, dropout=0.0).train()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d):
            module.eval()
    objective = methods.DLDObjective("self" if kind == "self" else copy.deepcopy(model), drop_prob=0.0)
    _, logs = objective(model, toy_batch(3))
    assert logs["kd"] == 0.0


@pytest.mark.parametrize("kind", TEACHERS)
def test_teacher_is_an_eval_mode_full_depth_pass(kind, monkeypatch):
    model = tiny_model(seed=1, dropout=0.3).train()
    objective = make_objective(kind, model, drop_prob=0.0, temperature=2.0)
    seen = []

    def spy(teacher_lp, student_lp, lengths, temperature):
        seen.append((teacher_lp, student_lp.detach(), lengths))
        return distillation_kl(teacher_lp, student_lp, lengths, temperature)

    monkeypatch.setattr(dld, "distillation_kl", spy)
    features, lengths, targets, target_lengths = toy_batch(3)
    with torch.no_grad():  # on a copy: the student's training pass moves the BatchNorm statistics
        expected, _, _ = copy.deepcopy(teacher_of(objective, model)).eval()(features, lengths)
    torch.manual_seed(0)
    _, logs = objective(model, (features, lengths, targets, target_lengths))
    teacher_lp, student_lp, out_lengths = seen[0]
    assert not teacher_lp.requires_grad
    assert torch.equal(teacher_lp, expected)
    assert logs["kd"] > 0, "the training-mode student keeps its dropout"
    assert logs["kd"] == pytest.approx(distillation_kl(expected, student_lp, out_lengths, 2.0).item())


@pytest.mark.parametrize("kind", TEACHERS)
def test_teacher_pass_restores_every_training_flag(kind):
    model = tiny_model(seed=1, dropout=0.1)
    objective = make_objective(kind, model, drop_prob=0.5, hidden_weight=0.1)
    teacher = teacher_of(objective, model)
    mix_training_flags(model)
    mix_training_flags(teacher)
    before = {"model": flags(model), "teacher": flags(teacher)}
    during = []  # the teacher's flags whenever its CTC head runs (teacher pass first)
    teacher.ctc_head.register_forward_pre_hook(lambda module, args: during.append(flags(teacher)))
    torch.manual_seed(0)
    objective(model, toy_batch(3))
    assert during[0] == [False] * len(before["teacher"]), "the teacher pass runs every submodule in eval mode"
    if kind == "self":
        assert during[1:] == [before["model"]], "the student runs in the modes it was given"
    assert {"model": flags(model), "teacher": flags(teacher)} == before


def test_teacher_pass_leaves_batch_norm_statistics_untouched():
    """A DLD step moves the running statistics exactly as the same student-only (LD) step does."""
    dld_model = tiny_model(seed=1, dropout=0.0).train()
    ld_model = copy.deepcopy(dld_model)
    batch = toy_batch(3)
    torch.manual_seed(7)
    _, dld_logs = methods.DLDObjective("self", drop_prob=0.5)(dld_model, batch)
    torch.manual_seed(7)
    _, ld_logs = methods.LayerDropCTC(4, drop_prob=0.5)(ld_model, batch)
    assert dld_logs["ctc"] == ld_logs["ctc"], "the same student pass"
    dld_state, ld_state = batch_norm_state(dld_model), batch_norm_state(ld_model)
    assert dld_state.keys() == ld_state.keys() and dld_state
    for name, value in ld_state.items():
        assert torch.equal(dld_state[name], value), name


def test_front_end_is_mode_independent_so_the_self_teacher_may_share_it():
    """The self-teacher reuses the student's front-end output: valid only while the front-end
    computes the same in training and eval mode (no dropout, no BatchNorm)."""
    model = tiny_model(dropout=0.3)
    features, lengths = toy_batch(0)[:2]
    train_x, _ = model.train().embed(features, lengths)
    eval_x, _ = model.eval().embed(features, lengths)
    assert torch.equal(train_x, eval_x)
    assert not any(isinstance(m, (nn.Dropout, nn.modules.batchnorm._BatchNorm)) for m in model.frontend.modules())
