"""MODEL_EMA: the moving average of the weights is what training evaluates and saves, what
``--eval-only`` and fine-tuning load, and what ``--resume`` restores beside the trained model
(the killed-run test of test_reliability.py resumes one too)."""

import json
import logging

import pytest
import torch
from torch import nn

import train_net
from conftest import small_cfg
from dab_detr.checkpoint import TRAINING_MODEL_KEY, DabDetrCheckpointer
from dab_detr.engine.ema import build_model_ema

# isort: split
# train_net on small built-in datasets, as there (the fixture is autouse: imported, it applies)
from test_train_net import _args, _train, small_builtin_datasets  # noqa: F401

EMA = ["MODEL_EMA.ENABLED", "True", "MODEL_EMA.DECAY", "0.5"]


def test_average_of_parameters_and_batch_norm_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    ema = build_model_ema(small_cfg("MODEL_EMA.ENABLED", "True", "MODEL_EMA.DECAY", "0.75"),
                          model)
    seen = []
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0 + step)
            model(torch.randn(5, 2))  # training mode: moves the running mean and variance
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        ema.update_parameters(model)
    averaged = ema.module.state_dict()
    for k, w in seen[-1].items():
        if w.is_floating_point():
            # the first update copies the weights, each later one moves 1 - DECAY towards them
            expected = 0.75 * (0.75 * seen[0][k] + 0.25 * seen[1][k]) + 0.25 * seen[2][k]
            torch.testing.assert_close(averaged[k], expected, msg=k)
            assert not torch.allclose(averaged[k], w), k
        else:  # num_batches_tracked: the model's own count
            assert averaged[k].item() == w.item() == 3, k


@pytest.mark.parametrize("decay", ["1.0", "-0.1"])
def test_decay_outside_0_1_is_refused(decay):
    cfg = small_cfg("MODEL_EMA.ENABLED", "True", "MODEL_EMA.DECAY", decay)
    with pytest.raises(ValueError, match="MODEL_EMA.DECAY"):
        build_model_ema(cfg, nn.Linear(2, 2))


def test_training_evaluates_saves_and_reloads_the_average(tmp_path):
    trainer = _train(tmp_path, "SOLVER.MAX_ITER", "4", "SOLVER.BASE_LR", "1e-3", *EMA)
    final = tmp_path / "model_final.pth"
    saved = torch.load(final, weights_only=True)
    averaged = trainer.model_ema.module.state_dict()
    trained = trainer.model.state_dict()
    for k, v in saved["model"].items():
        torch.testing.assert_close(v, averaged[k], rtol=0, atol=0, msg=k)
    for k, v in saved[TRAINING_MODEL_KEY].items():
        torch.testing.assert_close(v, trained[k], rtol=0, atol=0, msg=k)
    differ = [k for k, v in averaged.items()
              if v.is_floating_point() and not torch.equal(v, trained[k])]
    assert len(differ) > len(averaged) // 2, "the average is the trained model"

    # --eval-only reads "model", the average: it reproduces the evaluation after training ...
    predictions = (tmp_path / "inference" / "coco_instances_results.json").read_text()
    assert json.loads(predictions), "no detections to compare"
    evaluated = train_net.main(_args(tmp_path / "eval", "MODEL.WEIGHTS", str(final),
                                     eval_only=True))
    assert evaluated["bbox"] == pytest.approx(trainer._last_eval_results["bbox"], rel=0, abs=0,
                                              nan_ok=True)
    assert (tmp_path / "eval" / "inference" / "coco_instances_results.json").read_text() == \
        predictions
    # ... which the trained weights would not have
    torch.save({"model": saved[TRAINING_MODEL_KEY]}, tmp_path / "trained.pth")
    train_net.main(_args(tmp_path / "trained", "MODEL.WEIGHTS", str(tmp_path / "trained.pth"),
                         eval_only=True))
    assert (tmp_path / "trained" / "inference" / "coco_instances_results.json").read_text() != \
        predictions

    # fine-tuning (MODEL.WEIGHTS, without the trainer's state) starts from the average too
    tuned = train_net.Trainer(train_net.setup(_args(tmp_path / "tuned", "MODEL.WEIGHTS",
                                                    str(final), *EMA)))
    tuned.resume_or_load(resume=False)
    assert tuned.start_iter == 0
    for k, v in saved["model"].items():
        torch.testing.assert_close(tuned.model.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_resume_restores_the_trained_model_and_the_average(tmp_path):
    _train(tmp_path, "SOLVER.MAX_ITER", "3", "SOLVER.BASE_LR", "1e-3", *EMA)
    saved = torch.load(tmp_path / "model_final.pth", weights_only=True)
    resumed = train_net.Trainer(train_net.setup(_args(tmp_path, "SOLVER.MAX_ITER", "5", *EMA,
                                                      resume=True)))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 3
    for k, v in saved[TRAINING_MODEL_KEY].items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=0, msg=k)
    for k, v in saved["model"].items():
        torch.testing.assert_close(resumed.model_ema.module.state_dict()[k], v, rtol=0, atol=0,
                                   msg=k)
    # the next update averages (it does not copy the model, as the first of a run does)
    before = resumed.model_ema.module.state_dict()["class_embed.bias"].clone()
    resumed.train()
    after = resumed.model_ema.module.state_dict()["class_embed.bias"]
    trained = resumed.model.state_dict()["class_embed.bias"]
    assert not torch.equal(after, before) and not torch.equal(after, trained)


def test_checkpointer_without_an_average_reads_the_average_as_the_model(tmp_path):
    """What the demo, the predictor and export do: a plain checkpointer, weights only."""
    trainer = _train(tmp_path, "SOLVER.MAX_ITER", "2", *EMA)
    model = train_net.Trainer.build_model(trainer.cfg)
    DabDetrCheckpointer(model).load(str(tmp_path / "model_final.pth"))
    for k, v in trainer.model_ema.module.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_resume_with_the_average_turned_off_continues_the_trained_model(tmp_path, caplog):
    _train(tmp_path, "SOLVER.MAX_ITER", "3", "SOLVER.BASE_LR", "1e-3", *EMA)
    saved = torch.load(tmp_path / "model_final.pth", weights_only=True)
    resumed = train_net.Trainer(train_net.setup(_args(tmp_path, "SOLVER.MAX_ITER", "5",
                                                      resume=True)))
    with caplog.at_level(logging.WARNING):
        resumed.resume_or_load(resume=True)
    assert resumed.model_ema is None and resumed.start_iter == 3
    for k, v in saved[TRAINING_MODEL_KEY].items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert "the average is dropped" in caplog.text


def test_an_average_turned_on_at_resume_starts_from_the_loaded_weights(tmp_path):
    _train(tmp_path, "SOLVER.MAX_ITER", "3", "SOLVER.BASE_LR", "1e-3")
    saved = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert TRAINING_MODEL_KEY not in saved
    resumed = train_net.Trainer(train_net.setup(_args(tmp_path, "SOLVER.MAX_ITER", "3", *EMA,
                                                      resume=True)))
    resumed.resume_or_load(resume=True)
    for k, v in saved["model"].items():
        torch.testing.assert_close(resumed.model_ema.module.state_dict()[k], v, rtol=0, atol=0,
                                   msg=k)


def test_precise_bn_with_the_average_is_refused():
    cfg = small_cfg(*EMA, "TEST.PRECISE_BN.ENABLED", "True")
    with pytest.raises(ValueError, match="TEST.PRECISE_BN.ENABLED"):
        build_model_ema(cfg, nn.Linear(2, 2))
