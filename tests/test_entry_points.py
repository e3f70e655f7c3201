"""train.py and eval.py as a user runs them (real processes): signals to the process group
save and exit with 128 + signum, a resumed run continues bit-exactly with each step logged
once, and mistakes end with one line naming the key and the fix."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import subprocess_env
from absl import flags
from ml_collections import config_flags
from training_toys import tree_digest

from rope_jax import cli
from rope_jax.data import embedded
from rope_jax.training import checkpoint, metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A decoder LM small enough that a step takes milliseconds; a fixed decay length, so runs
# of any num_train_steps share one schedule.
TINY = (
    "configs/decoder.py:tiny,num_layers=1,d_model=32,num_heads=2,head_dim=16,d_ff=64,"
    "vocab_size=600,inputs_length=32,batch_size=4,eval_steps=0,measure_matmul_peak=False,"
    "log_every_steps=1,checkpoint_every_steps=0,optimizer.decay_steps=1000"
)


@pytest.fixture(scope="module")
def env():
    return subprocess_env.one_device()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tokenizer")
    embedded.load_or_train_tokenizer(workdir, vocab_size=600, num_extra_ids=100)
    return workdir / "tokenizer"


def _new_workdir(path, tokenizer_dir):
    path.mkdir(parents=True)
    shutil.copytree(tokenizer_dir, path / "tokenizer")
    return path


def _command(program, workdir, config=TINY, *flag_args):
    return [sys.executable, program, f"--config={config}", f"--workdir={workdir}", *flag_args]


def _run(command, env, timeout=300):
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    return done.returncode, done.stderr


def _rows(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def _signal_mid_run(command, env, workdir, signum, after_rows):
    """Starts ``command`` in its own process group, sends ``signum`` to the group (as a
    terminal's Ctrl-C does) once ``after_rows`` steps are logged, and waits for the exit."""
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while len(_rows(workdir)) < after_rows and process.poll() is None:
        assert time.monotonic() < deadline, "the run logged no steps"
        time.sleep(0.05)
    os.killpg(process.pid, signum)
    _, stderr = process.communicate(timeout=300)
    return process.returncode, stderr


def _last_line(stderr):
    return [line for line in stderr.splitlines() if line.strip()][-1]


def test_signals_save_exit_nonzero_and_the_resume_is_exact(tmp_path, env, tokenizer_dir):
    workdir = _new_workdir(tmp_path / "run", tokenizer_dir)
    endless = f"{TINY},num_train_steps=100000"
    # Ctrl-C reaches every process of the group, the input worker process included.
    code, stderr = _signal_mid_run(
        _command("train.py", workdir, f"{endless},num_workers=1"), env, workdir, signal.SIGINT, 3
    )
    assert code == 130, stderr[-3000:]
    assert "Received SIGINT: saving a checkpoint" in stderr
    assert "Traceback" not in stderr
    first_stop = checkpoint.complete_steps_on_disk(workdir / "checkpoints")
    assert len(first_stop) == 1 and f"Stopped by SIGINT at step {first_stop[0]}" in stderr
    assert [row["step"] for row in _rows(workdir)] == list(range(1, first_stop[0] + 1))

    # The re-run continues (num_workers is restart-safe); SIGTERM also saves, exits 143.
    code, stderr = _signal_mid_run(
        _command("train.py", workdir, endless), env, workdir, signal.SIGTERM, first_stop[0] + 3
    )
    assert code == 143, stderr[-3000:]
    assert f"Resumed from {workdir / 'checkpoints' / str(first_stop[0])}" in stderr
    second_stop = checkpoint.complete_steps_on_disk(workdir / "checkpoints")[-1]
    assert second_stop > first_stop[0]

    total = second_stop + 3
    code, stderr = _run(_command("train.py", workdir, f"{TINY},num_train_steps={total}"), env)
    assert code == 0, stderr[-3000:]
    reference_dir = _new_workdir(tmp_path / "reference", tokenizer_dir)
    code, stderr = _run(_command("train.py", reference_dir, f"{TINY},num_train_steps={total}"), env)
    assert code == 0, stderr[-3000:]

    resumed, reference = _rows(workdir), _rows(reference_dir)
    assert [row["step"] for row in resumed] == list(range(1, total + 1))  # each step once
    for name in ("loss", "grad_norm", "learning_rate"):
        assert [row[name] for row in resumed] == [row[name] for row in reference], name
    history = [json.loads(line) for line in open(workdir / "config_history.jsonl")]
    assert [entry["step"] for entry in history] == [0, first_stop[0], second_stop]


def test_a_refused_restart_exits_with_one_line_and_changes_nothing(tmp_path, env, tokenizer_dir):
    workdir = _new_workdir(tmp_path / "run", tokenizer_dir)
    code, stderr = _run(_command("train.py", workdir, f"{TINY},num_train_steps=1"), env)
    assert code == 0, stderr[-3000:]
    before = tree_digest(workdir)
    # Same parameter shapes: before, this resumed silently (tests/test_workdir.py refuses
    # the other keys in-process).
    code, stderr = _run(
        _command("train.py", workdir, f"{TINY},num_train_steps=2,position=alibi"), env
    )
    assert code == 1
    assert f"train.py: error: {workdir} holds a run (checkpoint at step 1)" in stderr
    assert "  model.position: 'rope' -> 'alibi'" in stderr
    assert _last_line(stderr).startswith("Nothing was written."), stderr[-2000:]
    assert _last_line(stderr).endswith("--config.accept_changes=model.position")
    assert tree_digest(workdir) == before
    # Accepting a shape change gets as far as the restore, which names the mismatch; Orbax
    # is shut down first, so its message is still the last line.
    code, stderr = _run(
        _command(
            "train.py",
            workdir,
            f"{TINY},num_train_steps=2,d_model=64",
            "--config.accept_changes=model.d_model",
        ),
        env,
    )
    assert code == 1
    assert _last_line(stderr).startswith("train.py: error: Cannot restore checkpoint"), stderr[
        -3000:
    ]
    assert "Traceback" not in stderr and "Event loop is closed" not in stderr
    assert "params/decoder" in _last_line(stderr)  # the mismatching array, by name
    assert len((workdir / "config_history.jsonl").read_text().splitlines()) == 1


def test_config_mistakes_end_with_one_line(tmp_path, env):
    code, stderr = _run(_command("train.py", tmp_path / "x", TINY, "--config.model.dmodel=64"), env)
    assert code == 1
    assert stderr.strip().splitlines() == [
        "train.py: error: --config.model.dmodel=64: config.model has no key 'dmodel'; "
        "did you mean d_model?"
    ]
    code, stderr = _run(_command("eval.py", tmp_path / "x", TINY), env)
    assert code == 1
    assert _last_line(stderr).startswith(
        f"eval.py: error: {TINY} is a pretrain config, which train.py runs, not eval.py"
    )
    assert not (tmp_path / "x").exists()
    missing = tmp_path / "no_fewglue"
    code, stderr = _run(
        _command(
            "eval.py",
            tmp_path / "cb",
            "configs/superglue.py:tiny",
            "--config.task=CB",
            f"--config.data_dir={missing}",
        ),
        env,
    )
    assert code == 1
    assert (
        stderr.strip()
        .splitlines()[-1]
        .startswith(f"eval.py: error: CB train split not found: {missing}/CB/train.jsonl")
    )
    assert "Traceback" not in stderr


def _parse(argv):
    values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "", flag_values=values, lock_config=True, sys_argv=argv
    )
    return cli.parse_flags(argv, values)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.model.dmodel=3", "config.model has no key 'dmodel'; did you mean d_model?"),
        ("--config.modl.d_model=3", "config has no key 'modl'; did you mean model?"),
        ("--config.optimizer.learning_rat=1", "did you mean learning_rate?"),
        ("--config.model.d_model=abc", "invalid literal for int()"),
    ],
)
def test_override_typos_name_the_key_and_close_matches(override, message, capsys):
    config = os.path.join(ROOT, "configs", "decoder.py") + ":tiny"
    with pytest.raises(SystemExit) as exited:
        _parse(["train.py", f"--config={config}", override])
    assert exited.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_a_bad_variant_names_the_choices(capsys):
    config = os.path.join(ROOT, "configs", "decoder.py") + ":huge"
    with pytest.raises(SystemExit):
        _parse(["train.py", f"--config={config}"])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.endswith("unknown variant 'huge'; choose one of ('tiny', 'small', 'base').")


@pytest.mark.parametrize(
    "arg, message",
    [
        ("tiny,taks=CB", "no config key 'taks'; did you mean task?"),
        ("tiny,max_input_length=long", "max_input_length must be int, got str 'long'."),
        ("huge", "unknown variant 'huge'; choose one of ('base', 'tiny')."),
    ],
)
def test_superglue_variant_mistakes_end_with_one_line_naming_the_key(arg, message, capsys):
    config = os.path.join(ROOT, "configs", "superglue.py") + f":{arg}"
    with pytest.raises(SystemExit) as exited:
        _parse(["eval.py", f"--config={config}"])
    assert exited.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_the_printed_tensorboard_command_works(tmp_path, monkeypatch):
    command = metrics.tensorboard_command(str(tmp_path / "tensorboard"))
    script = command.split(" --logdir")[0]
    assert os.path.exists(script) and command.endswith(str(tmp_path / "tensorboard"))
    shown = subprocess.run([script, "--version_tb"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and shown.stdout.strip()
    # Without the viewer installed, the command installs it first.
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert metrics.tensorboard_command("runs/x").startswith(
        f"{sys.executable} -m pip install tensorboard && "
    )


def test_a_second_ctrl_c_ends_with_one_line_and_exit_130(tmp_path, capsys):
    (tmp_path / "checkpoints" / "40").mkdir(parents=True)  # incomplete: not counted
    with pytest.raises(SystemExit) as exited:
        with cli.reported_errors((ValueError,), workdir=str(tmp_path)):
            raise KeyboardInterrupt
    assert exited.value.code == 130
    program = os.path.basename(sys.argv[0])
    assert capsys.readouterr().err.strip().splitlines() == [
        f"{program}: error: interrupted: stopped at once, without saving; no checkpoint was saved."
    ]
    # Expected errors: one line, no traceback; anything else propagates as it is.
    with pytest.raises(SystemExit) as exited:
        with cli.reported_errors((ValueError,)):
            raise ValueError("data.format='json': choose one of ...")
    assert exited.value.code == 1
    assert capsys.readouterr().err.strip().endswith("error: data.format='json': choose one of ...")
    with pytest.raises(RuntimeError):
        with cli.reported_errors((ValueError,)):
            raise RuntimeError("a bug")
