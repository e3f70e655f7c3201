"""The work directory as a contract, on the toy encoder: restarts that would change the
experiment are refused before anything is written, accepted ones are recorded, each step
appears once in metrics.jsonl and TensorBoard after a resume, and signals save and stop."""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
import subprocess_env
from training_toys import (
    ToyMLMIterator,
    enable_compilation_cache,
    restore_compilation_cache,
    toy_train_config,
    train_toy,
    tree_digest,
)

from rope_jax.training import checkpoint, metrics, preflight, workdir


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    previous = enable_compilation_cache(tmp_path_factory.mktemp("xla_cache"))
    yield
    restore_compilation_cache(previous)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A workdir trained for 4 steps (checkpoints 2 and 4); tests copy it."""
    path = tmp_path_factory.mktemp("finished") / "run"
    train_toy(path, toy_train_config())
    return path


@pytest.fixture
def run_copy(finished_run, tmp_path):
    path = tmp_path / "run"
    shutil.copytree(finished_run, path)
    return path


def _history(path):
    return [json.loads(line) for line in open(path / workdir.HISTORY_FILE)]


def _metric_steps(path):
    return [json.loads(line)["step"] for line in open(path / "metrics.jsonl")]


@pytest.mark.parametrize(
    "key, value",
    [
        ("model.position", "alibi"),  # same parameter shapes: would resume silently
        ("model.d_model", 64),
        ("data.paths", "/data/other/*.txt"),
        ("seed", 1),
        ("optimizer.learning_rate", 1e-3),
        ("batch_size", 16),
    ],
)
def test_a_restart_that_changes_the_experiment_is_refused_and_writes_nothing(run_copy, key, value):
    before = tree_digest(run_copy)
    config = toy_train_config(**{key: value, "num_train_steps": 6})
    with pytest.raises(workdir.ResumeError) as refused:
        train_toy(run_copy, config)
    message = str(refused.value)
    assert f"{key}: " in message and f"--config.accept_changes={key}" in message
    assert "num_train_steps" not in message  # restart-safe: not listed as a problem
    assert "Nothing was written" in message
    assert tree_digest(run_copy) == before


def test_restart_safe_changes_are_accepted_and_appended_to_the_history(run_copy):
    first_config = (run_copy / "config.json").read_bytes()
    config = toy_train_config(num_train_steps=6, log_every_steps=2, keep_checkpoints=2)
    result = train_toy(run_copy, config)
    assert sorted(result.history) == [5, 6]
    assert (run_copy / "config.json").read_bytes() == first_config  # the first stays
    history = _history(run_copy)
    assert [entry["step"] for entry in history] == [0, 4]
    assert history[0]["changes"] == {}
    assert history[1]["changes"] == {
        "keep_checkpoints": {"from": 3, "to": 2},
        "log_every_steps": {"from": 1, "to": 2},
        "num_train_steps": {"from": 4, "to": 6},
    }
    assert history[1]["config"]["num_train_steps"] == 6


def test_accepted_changes_are_named_and_then_part_of_the_record(run_copy):
    lower = toy_train_config(num_train_steps=6, **{"optimizer.learning_rate": 1e-3})
    with pytest.raises(workdir.ResumeError):
        train_toy(run_copy, lower)
    lower.accept_changes = "optimizer.learning_rate"
    resumed = train_toy(run_copy, lower)
    # Step 5 runs at state.step 4 of the cosine schedule (warmup 1, decay until 10).
    expected = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + np.cos(np.pi * 3 / 9))
    assert resumed.history[5]["learning_rate"] == pytest.approx(expected, rel=1e-6)
    assert _history(run_copy)[-1]["changes"]["optimizer.learning_rate"] == {
        "from": 3e-3,
        "to": 1e-3,
    }
    # The next restart compares with the accepted config: no need to name it again.
    again = toy_train_config(num_train_steps=7, **{"optimizer.learning_rate": 1e-3})
    assert sorted(train_toy(run_copy, again).history) == [7]
    # ... and going back to the first value is a change again.
    with pytest.raises(workdir.ResumeError, match=r"optimizer.learning_rate: 0.001 -> 0.003"):
        train_toy(run_copy, toy_train_config(num_train_steps=8))


def test_accept_changes_sections_star_and_typos(run_copy):
    config = toy_train_config(num_train_steps=6, **{"optimizer.weight_decay": 0.0, "seed": 3})
    config.accept_changes = "optimizer"
    with pytest.raises(workdir.ResumeError, match=r"seed: 0 -> 3") as refused:
        train_toy(run_copy, config)
    assert "weight_decay" not in str(refused.value)
    config.accept_changes = "optimizer.learnin_rate"
    with pytest.raises(preflight.ConfigError, match="did you mean optimizer.learning_rate"):
        train_toy(run_copy, config)
    config.accept_changes = "*"
    assert sorted(train_toy(run_copy, config).history) == [5, 6]


def test_a_checkpoint_without_its_config_record_is_not_resumed_blindly(run_copy):
    os.remove(run_copy / "config.json")
    os.remove(run_copy / workdir.HISTORY_FILE)
    before = tree_digest(run_copy)
    with pytest.raises(workdir.ResumeError, match="no config.json"):
        train_toy(run_copy, toy_train_config(num_train_steps=6))
    assert tree_digest(run_copy) == before


def test_without_a_checkpoint_a_new_config_replaces_the_record(tmp_path):
    path = tmp_path / "run"
    train_toy(path, toy_train_config(num_train_steps=1, checkpoint_every_steps=0))
    shutil.rmtree(path / "checkpoints")  # e.g. killed before its first save
    result = train_toy(path, toy_train_config(num_train_steps=2, seed=5))
    assert sorted(result.history) == [1, 2]
    assert json.loads((path / "config.json").read_text())["seed"] == 5
    assert _metric_steps(path) == [1, 2]  # the first attempt's row for step 1 is gone


def _tensorboard_scalars(logdir, tag):
    """(step, value) pairs as TensorBoard shows them (it applies purge_step markers)."""
    from tensorboard.backend.event_processing import event_accumulator

    accumulator = event_accumulator.EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def test_after_a_resume_each_step_is_logged_once(tmp_path):
    path = tmp_path / "run"
    train_toy(path, toy_train_config(num_train_steps=3))
    # A kill after step 3 was logged but before it was saved: only checkpoint 2 survives,
    # and the last metrics line was cut short.
    shutil.rmtree(path / "checkpoints" / "3")
    with open(path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.')
    resumed = train_toy(path, toy_train_config(num_train_steps=4))
    assert sorted(resumed.history) == [3, 4]
    reference = train_toy(tmp_path / "reference", toy_train_config(num_train_steps=4))
    rows = [json.loads(line) for line in open(path / "metrics.jsonl")]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert [row["loss"] for row in rows] == [reference.history[s]["loss"] for s in (1, 2, 3, 4)]
    shown = _tensorboard_scalars(path / "tensorboard", "loss")
    assert [step for step, _ in shown] == [1, 2, 3, 4]
    np.testing.assert_allclose([v for _, v in shown], [row["loss"] for row in rows], rtol=1e-6)


def test_metrics_rows_after_a_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "eval_loss": 3.0}\nnot json\n{"step": 3}\n{"st')
    assert metrics.drop_rows_after(str(path), 2) == 3
    assert path.read_text() == '{"step": 1}\n{"step": 2, "eval_loss": 3.0}\n'
    assert metrics.drop_rows_after(str(path), 2) == 0


class _SignalsAt(ToyMLMIterator):
    """Sends ``signals`` to this process when batch ``at`` is fetched."""

    def __init__(self, batch_size, at, signals):
        super().__init__(batch_size)
        self.at, self.signals = at, signals

    def __next__(self):
        if self.index == self.at:
            for signum in self.signals:
                os.kill(os.getpid(), signum)
        return super().__next__()


def test_first_sigint_saves_and_stops_and_the_resume_is_exact(tmp_path):
    config = toy_train_config(num_train_steps=6, checkpoint_every_steps=100)
    # The handler before the run: Python's default, or SIG_IGN when the suite runs as a
    # background job of a non-interactive shell (which starts it with SIGINT ignored).
    before = signal.getsignal(signal.SIGINT)
    stopped = train_toy(tmp_path / "run", config, iterator=_SignalsAt(8, 3, [signal.SIGINT]))
    assert stopped.stop_signal == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    last = max(stopped.history)
    assert checkpoint.complete_steps_on_disk(tmp_path / "run" / "checkpoints") == [last]
    resumed = train_toy(tmp_path / "run", config)
    reference = train_toy(tmp_path / "reference", config)
    losses = {s: m["loss"] for s, m in {**stopped.history, **resumed.history}.items()}
    assert losses == {s: m["loss"] for s, m in reference.history.items()}
    assert _metric_steps(tmp_path / "run") == list(range(1, 7))
    assert signal.getsignal(signal.SIGINT) is before


def test_second_sigint_stops_at_once_without_saving(tmp_path):
    config = toy_train_config(num_train_steps=6, checkpoint_every_steps=2)
    iterator = _SignalsAt(8, 3, [signal.SIGINT, signal.SIGINT])
    with pytest.raises(KeyboardInterrupt):
        train_toy(tmp_path / "run", config, iterator=iterator)
    # Step 2's checkpoint is complete; nothing later was saved.
    assert checkpoint.complete_steps_on_disk(tmp_path / "run" / "checkpoints") == [2]
    resumed = train_toy(tmp_path / "run", config)
    assert sorted(resumed.history) == [3, 4, 5, 6]


def test_a_num_train_steps_change_that_moves_the_schedule_is_reported():
    recorded = toy_train_config(num_train_steps=100).to_dict()
    recorded["optimizer"].update(decay_steps=None, schedule="cosine", warmup_steps=10)
    new = json.loads(json.dumps(recorded))
    new["num_train_steps"] = 200
    resume = workdir.Resume(
        "w", 100, new, {"num_train_steps": (100, 200)}, [], True, recorded=recorded
    )
    note = workdir.schedule_note(resume)
    # Cosine from 3e-3 to 3e-4: 3e-4 at step 100 before, the middle of the new decay now.
    middle = 3e-4 + (3e-3 - 3e-4) * 0.5 * (1 + np.cos(np.pi * 90 / 190))
    assert f"at step 100 the rate is now {middle:.3g}, 0.0003 under the first" in note
    assert "--config.optimizer.decay_steps=100" in note
    new["optimizer"]["decay_steps"] = 100
    recorded["optimizer"]["decay_steps"] = 100
    assert workdir.schedule_note(resume) is None


def test_every_key_has_a_documented_class():
    """The three lists of docs/training.md are the ones in code, and every key of the
    pretraining configs falls into one of them."""
    flat = workdir.flatten(workdir.as_plain_dict(toy_train_config()))
    classes = {key: workdir.classify(key) for key in flat}
    assert classes["model.position"] == classes["data.paths"] == "experiment"
    assert classes["model.remat"] == classes["mesh.data"] == "restart_safe"
    assert classes["model.scan_layers"] == "restart_safe"  # converted on restore (relayout)
    assert classes["optimizer.learning_rate"] == classes["batch_size"] == "hyperparameter"
    assert classes["optimizer.grad_accum_steps"] == "restart_safe"
    docs = open(os.path.join(os.path.dirname(__file__), "..", "docs", "training.md")).read()
    for name in (*workdir.RESTART_SAFE, *workdir.HYPERPARAMETERS, *workdir.EXPERIMENT):
        assert f"`{name}`" in docs, name


def test_start_checks_fail_before_anything_is_written(tmp_path):
    path = tmp_path / "run"
    for overrides, message in (
        ({"optimizer.learning_rate": -1e-3}, "optimizer.learning_rate=-0.001: must be"),
        ({"optimizer.b2": 1.0}, r"optimizer.b2=1.0: must be in \[0, 1\)"),
        ({"keep_checkpoints": 0}, "keep_checkpoints=0"),
        ({"eval_every_steps": -5}, "eval_every_steps=-5"),
    ):
        with pytest.raises(preflight.ConfigError, match=message):
            train_toy(path, toy_train_config(**overrides))
    assert not path.exists()


def test_objective_must_match_the_model_family(tmp_path):
    from configs import common
    from rope_jax.training import trainer

    config = common.base_config()
    config.model.family, config.data.objective = "encoder_decoder", "mlm"
    with pytest.raises(preflight.ConfigError, match=r"objective='mlm' makes encoder batches"):
        preflight.check_objective_matches_family(config)
    config.model.family = "encoder"
    preflight.check_objective_matches_family(config)
    config.data.objective = "causal_lm"
    with pytest.raises(preflight.ConfigError, match="configs/decoder.py"):
        preflight.check_objective_matches_family(config)
    # Through the trainer: refused at start (it used to fail inside EncoderDecoder.__call__).
    mt5 = _pretraining_config("mt5", "tiny,objective=mlm")
    with pytest.raises(preflight.ConfigError, match="model.family='encoder_decoder'"):
        trainer.train_and_evaluate(mt5, str(tmp_path / "run"), devices=jax.devices()[:1])
    assert not (tmp_path / "run").exists()


def test_config_kind_belongs_to_the_entry_point():
    import importlib

    superglue = importlib.import_module("configs.superglue").get_config("tiny")
    with pytest.raises(preflight.ConfigError, match="superglue config, which eval.py runs"):
        preflight.check_kind(superglue, "train.py", "configs/superglue.py:tiny")
    with pytest.raises(preflight.ConfigError, match="pretrain config, which train.py runs"):
        preflight.check_kind(toy_train_config(), "eval.py", "configs/decoder.py:tiny")
    preflight.check_kind(superglue, "eval.py")
    preflight.check_kind(toy_train_config(), "train.py")
    with pytest.raises(preflight.ConfigError, match="superglue config"):
        train_toy("/nonexistent/never/created", superglue)


def test_held_out_split_too_small_fails_before_the_tokenizer(tmp_path):
    """The corpus is indexed and checked before a tokenizer is trained on it."""
    from rope_jax.training import trainer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"document {i} has words\n\n" for i in range(5)))
    config = _pretraining_config(
        "decoder",
        f"tiny,paths={corpus},num_train_steps=2,eval_every_steps=2,batch_size=2,"
        "inputs_length=16,num_layers=1,measure_matmul_peak=False",
    )
    with pytest.raises(preflight.ConfigError) as failed:
        trainer.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    message = str(failed.value)
    assert "0 of 5" in message and "at step 2 " in message
    assert "--config.data.eval_every=5" in message and "--config.eval_steps=0" in message
    assert not (tmp_path / "run").exists()
    # Each suggested fix passes the check.
    for fix in ({"eval_every": 5}, {"eval_every": 0}):
        preflight.check_held_out_split(
            5, eval_every=fix["eval_every"], evaluates=True, process_count=1, source="c"
        )
    preflight.check_held_out_split(5, eval_every=20, evaluates=False, process_count=1, source="c")
    with pytest.raises(preflight.ConfigError, match="fewer than the 4 processes"):
        preflight.check_held_out_split(
            5, eval_every=2, evaluates=False, process_count=4, source="c"
        )


def _pretraining_config(family, arg):
    import importlib

    return importlib.import_module(f"configs.{family}").get_config(arg)


def test_a_cell_stopped_by_a_signal_stops_the_ablation_grid(monkeypatch, tmp_path):
    """eval.py's ablation trains one cell after another; a Ctrl-C that saved one cell must
    not let the grid go on to the next."""
    from configs import ablation as ablation_config
    from rope_jax.experiments import ablation, ablation_grid
    from rope_jax.training import interrupts, trainer

    config = ablation_config.get_config("tiny")
    cell = next(c for c in ablation_grid.grid(config) if not c.skip_reason)
    stopped = trainer.TrainResult(None, {}, {}, str(tmp_path), stop_signal=signal.SIGINT)
    monkeypatch.setattr(trainer, "train_and_evaluate", lambda *args, **kwargs: stopped)
    with pytest.raises(interrupts.StoppedBySignal) as raised:
        ablation._train(ablation_grid.seeded(cell, 0), str(tmp_path), config)
    assert interrupts.exit_code(raised.value.signum) == 130


def test_a_restore_that_fails_is_one_line_and_records_nothing(run_copy):
    """A model of other shapes under an unchanged config (or an accepted shape change):
    the restore error names the checkpoint in one line, and the start is not recorded."""
    from training_toys import ToyEncoder

    from rope_jax.training import trainer

    history = (run_copy / workdir.HISTORY_FILE).read_bytes()
    with pytest.raises(checkpoint.CheckpointError) as failed:
        trainer.train_and_evaluate(
            toy_train_config(num_train_steps=6),
            str(run_copy),
            inputs=trainer.Inputs(train=ToyMLMIterator(8)),
            model=ToyEncoder(d_model=16),
            devices=jax.devices()[:1],
        )
    message = str(failed.value)
    assert "\n" not in message and f"Cannot restore checkpoint {run_copy}/checkpoints/4" in message
    # Named from the checkpoint's metadata before any array is read.
    assert "params/embedding has shape (64, 32) there and (64, 16) in this model" in message
    assert (run_copy / workdir.HISTORY_FILE).read_bytes() == history


def test_a_resume_in_the_same_second_keeps_the_earlier_tensorboard_events(tmp_path, monkeypatch):
    """tensorboardX names event files by the second; a restart within it must not reuse
    (and overwrite) the previous start's file."""
    import tensorboardX.event_file_writer as event_file_writer

    monkeypatch.setattr(event_file_writer.time, "time", lambda: 1_800_000_000.0)
    first = metrics.MetricWriter(str(tmp_path), enabled=True)
    for step in (1, 2, 3):
        first.write_scalars(step, {"loss": float(10 - step)})
    first.close()
    resumed = metrics.MetricWriter(str(tmp_path), enabled=True, resume_step=2)
    for step in (3, 4):
        resumed.write_scalars(step, {"loss": float(20 - step)})
    resumed.close()
    shown = _tensorboard_scalars(tmp_path / "tensorboard", "loss")
    assert shown == [(1, 9.0), (2, 8.0), (3, 17.0), (4, 16.0)]


WRITER_SCRIPT = """
import importlib.util, sys
from rope_jax.training import metrics
writer = metrics.MetricWriter(sys.argv[1], enabled=True)
writer.write_scalars(1, {"loss": 2.5})
writer.close()
print("torch" in sys.modules, importlib.util.find_spec("torch") is not None)
"""


def test_the_metric_writer_does_not_import_torch(tmp_path):
    """tensorboardX imports torch for type hints when it can (2 s of every run's start-up
    where torch is installed: the test extra installs it); the writer loads it without,
    and torch stays importable."""
    done = subprocess.run(
        [sys.executable, "-c", WRITER_SCRIPT, str(tmp_path)],
        env=subprocess_env.one_device(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["False", "True"], done.stdout
    assert _tensorboard_scalars(tmp_path / "tensorboard", "loss") == [(1, 2.5)]
