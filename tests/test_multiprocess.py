"""Several JAX processes for real (2 processes on 127.0.0.1, CPU collectives over gloo),
started by ``python -m rope_jax.launch`` as a user would: 2 processes train on the batches
of 1 (data-parallel and FSDP meshes), read every document of an epoch once, stop together
on a signal to one of them, resume exactly on 2 or 1 processes, end within seconds when a
peer is killed, and fine-tune with ``eval.py``.

Runs are shared between assertions (one SIGTERM-stopped run is also the checkpoint that
both resumes start from) and use the suite's compilation cache. Each test starts real
processes and compiles programs for 2 processes, so they carry the ``multiprocess`` mark
(``pytest -m "not multiprocess"`` leaves them out while developing; ``make test`` and CI
run them)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from subprocess_env import COMPILE_FLAGS
from test_entry_points import ROOT, TINY, _rows
from test_superglue_finetune import _fixture_data

from rope_jax import launch as launch_lib
from rope_jax.data import embedded
from rope_jax.training import checkpoint

pytestmark = pytest.mark.multiprocess

# One CPU device per process; the 1-process reference gets two, so all meshes have 2.
ONE_DEVICE = f"--xla_force_host_platform_device_count=1 {COMPILE_FLAGS}"
TWO_DEVICES = f"--xla_force_host_platform_device_count=2 {COMPILE_FLAGS}"
ENDLESS = f"{TINY},num_train_steps=100000"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    environment = dict(os.environ)
    environment.update(
        XLA_FLAGS=ONE_DEVICE,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT + os.pathsep + environment.get("PYTHONPATH", ""),
    )
    # The suite's compilation cache (conftest) when it set one; else one for this module.
    if "JAX_COMPILATION_CACHE_DIR" not in environment:
        environment.update(
            JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla_cache")),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        )
    return environment


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tokenizer")
    embedded.load_or_train_tokenizer(workdir, vocab_size=600, num_extra_ids=100)
    return workdir / "tokenizer"


def _workdir(path, tokenizer_dir):
    path.mkdir(parents=True)
    shutil.copytree(tokenizer_dir, path / "tokenizer")
    return path


class Launch:
    """``python -m rope_jax.launch --num_processes=2 -- <program> ...`` in the background,
    its prefixed output in a file."""

    def __init__(self, tmp_path, env, program, *args, num_processes=2, grace=60):
        self.log = tmp_path / f"launch_{time.monotonic_ns()}.log"
        command = [
            sys.executable,
            "-m",
            "rope_jax.launch",
            f"--num_processes={num_processes}",
            f"--grace_seconds={grace}",
            "--",
            program,
            *args,
        ]
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def pids(self) -> dict[int, int]:
        return {
            int(i): int(p)
            for i, p in re.findall(r"\[launch\] process (\d+): pid (\d+)", self.output)
        }

    def wait(self, timeout=300) -> int:
        return self.process.wait(timeout=timeout)

    def lines_of(self, index: int) -> list[str]:
        return [
            line[len(f"[{index}] ") :]
            for line in self.output.splitlines()
            if line.startswith(f"[{index}] ")
        ]


def _wait_for_rows(workdir, rows, launch, timeout=300):
    deadline = time.monotonic() + timeout
    while len(_rows(workdir)) < rows:
        assert launch.process.poll() is None, launch.output[-3000:]
        assert time.monotonic() < deadline, "the run logged no steps"
        time.sleep(0.05)


def _train(workdir, config, *flags):
    return ["train.py", f"--config={config}", f"--workdir={workdir}", *flags]


def _run_one_process(env, workdir, config):
    done = subprocess.run(
        [sys.executable, *_train(workdir, config)],
        cwd=ROOT,
        env={**env, "XLA_FLAGS": TWO_DEVICES},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _losses(workdir):
    return {row["step"]: row["loss"] for row in _rows(workdir)}


def _data_item(workdir, step):
    return json.loads(
        (workdir / "checkpoints" / str(step) / checkpoint.DATA / "metadata").read_text()
    )


def test_two_processes_train_as_one_stop_together_and_resume_on_two_or_one(
    tmp_path, env, tokenizer_dir
):
    # 2 processes, data-parallel mesh; SIGTERM reaches process 1 only.
    workdir = _workdir(tmp_path / "two", tokenizer_dir)
    stopped = Launch(tmp_path, env, *_train(workdir, ENDLESS))
    _wait_for_rows(workdir, 3, stopped)
    os.kill(stopped.pids()[1], signal.SIGTERM)
    assert stopped.wait() == 143, stopped.output[-3000:]
    (stop,) = checkpoint.complete_steps_on_disk(workdir / "checkpoints")
    for index in (0, 1):  # both agreed on the step; both exit as stopped by SIGTERM
        assert any(
            f"all processes save step {stop} and stop" in line for line in stopped.lines_of(index)
        )
    assert "process 0: exit code 143, process 1: exit code 143" in stopped.output
    assert sorted(_losses(workdir)) == list(range(1, stop + 1))
    one_dir = tmp_path / "one"
    shutil.copytree(workdir, one_dir)

    # Resume with 2 processes on an FSDP mesh (weights sharded over the processes) ...
    total = stop + 2
    resumed = Launch(
        tmp_path,
        env,
        *_train(
            workdir,
            f"{TINY},num_train_steps={total}",
            "--config.mesh.data=1",
            "--config.mesh.fsdp=2",
        ),
    )
    # ... and with 1 process (two devices) from the same checkpoint.
    _run_one_process(env, one_dir, f"{TINY},num_train_steps={total}")
    assert resumed.wait() == 0, resumed.output[-3000:]
    # The reference: 1 process, never stopped, saving at the stop step too.
    reference = _workdir(tmp_path / "reference", tokenizer_dir)
    _run_one_process(
        env, reference, f"{TINY},num_train_steps={total},checkpoint_every_steps={stop}"
    )

    want = _losses(reference)
    two, one = _losses(workdir), _losses(one_dir)
    assert sorted(two) == sorted(one) == list(range(1, total + 1))  # each step logged once
    # Same global batches: the losses of 2 processes are those of 1 (float32 sums in
    # another order on the FSDP mesh), the 1-process resume is bit-exact.
    np.testing.assert_allclose([two[s] for s in want], list(want.values()), rtol=2e-6)
    assert [one[s] for s in want] == list(want.values())
    # The input state is one item, the same whatever number of processes saved it.
    assert _data_item(workdir, stop) == _data_item(reference, stop)
    assert _data_item(workdir, total) == _data_item(one_dir, total) == _data_item(reference, total)
    print(
        f"losses, 1 process: {[round(want[s], 6) for s in sorted(want)]}\n"
        f"losses, 2 processes (stop at {stop}, FSDP after): "
        f"{[round(two[s], 6) for s in sorted(two)]}"
    )


class _Ended:
    """A process as ``launch`` polls it: already ended with ``returncode``."""

    def __init__(self, returncode):
        self.returncode = returncode

    def poll(self):
        return self.returncode


def test_the_launch_reports_the_killed_process_when_a_peer_ended_after_it():
    """Seen ended in the same sweep (a peer whose collectives failed, and the process killed
    before it), the killed process is the failure reported; otherwise the lowest index."""
    first = launch_lib._first_failure
    assert first([_Ended(None), _Ended(1), _Ended(-9)]) == (2, -9)
    assert first([_Ended(1), _Ended(0), _Ended(3)]) == (0, 1)
    assert first([_Ended(-15), _Ended(-9)]) == (0, -15)
    assert launch_lib.exit_status(first([_Ended(1), _Ended(-9)])[1]) == 128 + signal.SIGKILL


def test_killing_one_process_ends_the_other_with_one_line(tmp_path, env, tokenizer_dir):
    workdir = _workdir(tmp_path / "run", tokenizer_dir)
    run = Launch(tmp_path, env, *_train(workdir, ENDLESS))
    _wait_for_rows(workdir, 2, run)
    killed = time.monotonic()
    os.kill(run.pids()[0], signal.SIGKILL)  # the coordinator's process
    assert run.wait() == 128 + signal.SIGKILL, run.output[-3000:]
    seconds = time.monotonic() - killed
    survivor = run.lines_of(1)
    # Our one line; jax's own coordination-service thread can notice the dead coordinator
    # in the same instant and log its fatal error after it, before the process is gone.
    ours = [
        line
        for line in survivor
        if line.startswith("train.py: error: a collective operation with the other processes")
    ]
    assert len(ours) == 1, run.output[-3000:]
    assert not any(line.startswith("Traceback") for line in survivor), run.output[-3000:]
    assert "process 1: exit code 1" in run.output  # ended on its own, not by the launcher
    assert seconds < 20, seconds
    print(f"kill -9 of process 0: process 1 ended with exit code 1 after {seconds:.1f} s")


DOCUMENTS_SCRIPT = """
import json, sys
import jax
import ml_collections
from configs import decoder
from rope_jax.training import sharding, trainer

config = decoder.get_config(sys.argv[1])
sharding.maybe_initialize_distributed(config)
inputs = trainer.build_inputs(config, sys.argv[2])
steps = int(sys.argv[3])
rows = []
for step in range(steps):
    batch = next(inputs.train)
    for row, stream in enumerate(inputs.train.streams):
        ids = batch["target_tokens"][row][batch["segment_ids"][row] > 0]
        text = inputs.train.tokenizer.decode(ids.tolist())
        rows.append([stream + step * config.batch_size, text])
held_out = []
for batch in inputs.eval_batches():
    for ids, segments in zip(batch["target_tokens"], batch["segment_ids"]):
        if segments.any():
            held_out.append(inputs.train.tokenizer.decode(ids[segments > 0].tolist()))
with open(f"{sys.argv[2]}/read_{jax.process_index()}.json", "w") as f:
    json.dump({"rows": rows, "held_out": held_out}, f)
"""


def test_every_document_of_an_epoch_is_read_once_across_processes(tmp_path, env):
    # One document per row (no packing, rows longer than any document): row r of batch t
    # is global position r + 4 t, so the first 28 positions are epoch 0.
    documents = [f"document {i:02d} of the corpus" for i in range(35)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(documents) + "\n")
    script = tmp_path / "read_documents.py"
    script.write_text(DOCUMENTS_SCRIPT)
    config = (
        f"tiny,tokenizer.kind=bytes,vocab_size=260,inputs_length=64,batch_size=4,pack=False,"
        f"data.text_mode=lines,data.paths={corpus},eval_every=5,eval_steps=3"
    )
    run = Launch(tmp_path, env, str(script), config, str(tmp_path), "8")
    assert run.wait() == 0, run.output[-3000:]
    read = [json.loads((tmp_path / f"read_{i}.json").read_text()) for i in (0, 1)]
    by_position = dict(read[0]["rows"] + read[1]["rows"])
    assert len(by_position) == 32  # 8 steps x 4 rows, each position made by one process
    training = [d for i, d in enumerate(documents) if i % 5 != 4]
    epoch = [by_position[k] for k in range(len(training))]
    assert sorted(epoch) == training  # each of the 28 training documents once
    held_out = read[0]["held_out"] + read[1]["held_out"]
    assert sorted(held_out) == documents[4::5]  # 7 held-out documents, each read once
    print(
        f"documents read in epoch 0 by 2 processes: {len(epoch)} of {len(training)}, "
        f"{len(set(epoch))} distinct; held out: {len(held_out)} of 7"
    )


def test_eval_py_fine_tunes_with_two_processes(tmp_path, env, tokenizer_dir):
    data = tmp_path / "data"
    _fixture_data(data)
    workdir = tmp_path / "run"
    run = Launch(
        tmp_path,
        env,
        "eval.py",
        f"--config=configs/superglue.py:tiny,task=CB,data_dir={data}",
        f"--config.tokenizer={tokenizer_dir / 'spm.model'}",
        "--config.num_train_steps=4",
        "--config.batch_size=4",
        "--config.eval_batch_size=4",
        "--config.max_input_length=32",
        "--config.max_target_length=6",
        "--config.model.vocab_size=600",
        "--config.measure_matmul_peak=False",
        f"--workdir={workdir}",
    )
    assert run.wait() == 0, run.output[-3000:]
    results = json.loads((workdir / "metrics.json").read_text())
    assert results["CB"]["num_examples"] == 6
    # Both processes evaluated the same model on the same rows.
    evals = [
        [line.split("] ", 1)[1] for line in run.lines_of(i) if "eval at step 4" in line]
        for i in (0, 1)
    ]
    assert evals[0] == evals[1] and evals[0]
    assert checkpoint.complete_steps_on_disk(workdir / "CB" / "checkpoints") == [4]
    # Both hold the same results; only process 0 writes the files and prints the table.
    tables = [[line for line in run.lines_of(i) if line.startswith("|")] for i in (0, 1)]
    assert tables[0] and not tables[1], tables
    assert (workdir / "predictions" / "CB_val.jsonl").exists()
