import json

import pytest
import torch
from typer.testing import CliRunner

from sat_export.assets import demo_checkpoint_path
from sat_export.cli.train import app
from tests.conftest import fake_cpu
from training.checkpoint import load_checkpoint, read_payload
from training.data import load_captions
from training.options import TrainConfig
from training.shapes import make_shapes
from training.train import Trainer, box_attention_loss, resume, train


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes") / "s", 20, seed=21, size=64)


def tiny(shapes, out, **overrides) -> TrainConfig:
    base = dict(data=str(shapes), out=str(out), backbone="mobilenet_v3_small_s16", grid=4, resize=64, crop=64,
                batch_size=4, val_frac=0.2, test_frac=0.0, cache_dir=str(out / "cache"), threads=1)
    return TrainConfig(**{**base, **overrides})


def test_loss_falls_on_a_tiny_set(shapes, tmp_path):
    trainer = Trainer(tiny(shapes, tmp_path, epochs=8, lr=3e-3, dropout=0.0, warmup=0.0))
    batch = next(iter(trainer.loader(trainer.data.train, shuffle=False)))
    with torch.no_grad():
        before = trainer.loss(*batch)[1].item()
    trainer.fit()
    with torch.no_grad():
        after = trainer.loss(*batch)[1].item()
    assert after < 0.6 * before, (before, after)


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(shapes, tmp_path):
    # End-to-end (backbone batch-norm, images on the fly) with dropout: every kind of state matters.
    common = dict(epochs=3, finetune_encoder=True, dropout=0.3, lr=2e-3, encoder_lr=1e-3)
    straight = train(tiny(shapes, tmp_path / "a", **common))
    n_train = sum(it.split == "train" for it in load_captions(shapes, val_frac=0.2, test_frac=0.0))
    steps_per_epoch = -(-n_train // 4)
    assert steps_per_epoch >= 2
    stopped = train(tiny(shapes, tmp_path / "b", max_steps=steps_per_epoch + 1, **common))  # one step into epoch 2
    assert stopped == {"epoch": 1, "step": steps_per_epoch + 1, "stopped": "max_steps"}
    saved = read_payload(tmp_path / "b" / "last.pth")  # torch.load(weights_only=True)
    assert saved["train"]["step_in_epoch"] == 1 and set(saved["train"]["resume"]) == {"optimizer", "scheduler", "rng"}
    resumed = resume(tmp_path / "b" / "last.pth")
    untimed = lambda record: {k: v for k, v in record.items() if not k.endswith("_seconds")}  # noqa: E731
    assert untimed(resumed) == untimed(straight)
    a = load_checkpoint(tmp_path / "a" / "last.pth").state_dict
    b = load_checkpoint(tmp_path / "b" / "last.pth").state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_validating_the_last_epoch_only_trains_the_same_weights_sooner(shapes, tmp_path):
    """End to end with batch-norm re-estimation and dropout: skipping the earlier epochs' validation changes
    nothing the model or the RNG sees, so the weights and the last epoch's metrics are the same."""
    common = dict(epochs=3, finetune_encoder=True, dropout=0.3, lr=2e-3, encoder_lr=1e-3)
    untimed = lambda record: {k: v for k, v in record.items() if not k.endswith("_seconds")}  # noqa: E731
    every = Trainer(tiny(shapes, tmp_path / "every", **common))  # seeds the RNG: one trainer at a time
    every_record = untimed(every.fit())
    last = Trainer(tiny(shapes, tmp_path / "last", val_every_epoch=False, **common))
    assert untimed(last.fit()) == every_record
    assert [r["epoch"] for r in every.history] == [1, 2, 3] and [r["epoch"] for r in last.history] == [3]
    a, b = every.model.state_dict(), last.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_box_attention_loss_is_minus_log_mass_in_the_box_over_boxed_steps_only():
    targets = torch.zeros(1, 3, 4)
    targets[0, 1] = torch.tensor([1.0, 0.5, 0.0, 0.0])  # only step 1 emits a boxed word
    alphas = torch.tensor([[[0.0, 0.0, 0.0, 1.0], [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]]])
    torch.testing.assert_close(box_attention_loss(alphas, targets), -torch.log(torch.tensor(0.375)))
    alphas[0, 1] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert box_attention_loss(alphas, targets).item() == pytest.approx(0.0, abs=1e-6)
    assert box_attention_loss(alphas, torch.zeros(1, 3, 4)).item() == 0.0


def test_checkpoints_hold_history_and_best_is_by_val_bleu(shapes, tmp_path):
    train(tiny(shapes, tmp_path, epochs=2))
    best, last = load_checkpoint(tmp_path / "best.pth"), load_checkpoint(tmp_path / "last.pth")
    history = last.train["history"]
    assert [h["epoch"] for h in history] == [1, 2] and "resume" not in best.train
    assert best.train["best"]["bleu4"] == max(h["bleu4"] for h in history)
    assert len((tmp_path / "history.jsonl").read_text().splitlines()) == 2
    with pytest.raises(Exception, match="no training state to resume"):
        resume(tmp_path / "best.pth")


def test_cli_make_shapes_train_and_evaluate(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["make-shapes", str(tmp_path / "s"), "--n", "12", "--seed", "4", "--size", "64"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [
        "train", str(tmp_path / "s"), "--out", str(tmp_path / "run"), "--backbone", "mobilenet_v3_small_s16",
        "--grid", "4", "--resize", "64", "--crop", "64", "--epochs", "1", "--batch-size", "4",
        "--val-frac", "0.3", "--cache-dir", str(tmp_path / "cache"), "--resize-mode", "squash"])
    assert result.exit_code == 0, result.output
    best = load_checkpoint(tmp_path / "run" / "best.pth")
    assert best.config.preprocess.resize_mode == "squash" and best.train["config"]["resize_mode"] == "squash"
    result = runner.invoke(app, ["evaluate", "--ckpt", str(tmp_path / "run" / "best.pth"),
                                 "--data", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["images"] == 12 and 0 <= report["bleu4"] <= 1
    assert report["grounding"]["n_words"] >= 0


@pytest.mark.parametrize("args, message", [
    (["train"], "give DATA"),
    (["train", "nowhere/captions.txt"], "captions file not found"),
    (["train", ".", "--preset", "huge"], "unknown preset"),
    (["train", ".", "--resize-mode", "stretch"], "resize_mode must be one of shorter_side, squash, torchvision"),
    (["make-shapes", "x", "--n", "0"], "n must be at least 1"),
])
def test_cli_user_errors_are_one_line_and_exit_1(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_shipped_demo_checkpoint_loads_safely_and_is_small():
    path = demo_checkpoint_path()
    assert path.stat().st_size <= 10 * 2**20
    ck = load_checkpoint(path)  # weights_only=True, validated against its config
    assert ck.config.backbone == "mobilenet_v3_small_s16" and "resume" not in ck.train


@pytest.mark.parametrize("native", [True, False])
def test_amp_trains_in_bf16_only_where_the_cpu_has_it_and_says_so(shapes, tmp_path, monkeypatch, native):
    import io

    from rich.console import Console

    import training.train

    monkeypatch.setattr(training.train, "cpu_info", lambda: fake_cpu(avx512=native, vnni=native, avx512_bf16=native))
    out = io.StringIO()
    trainer = Trainer(tiny(shapes, tmp_path, epochs=1, amp=True), console=Console(file=out, width=200))
    assert trainer.amp is native
    assert ("bf16 is emulated on this CPU" in out.getvalue()) is not native
    record = trainer.fit()
    assert record["precision"] == ("bf16" if native else "fp32")
