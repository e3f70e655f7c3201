"""The train loop on a toy encoder: exact resume, interrupted saves, SIGTERM, NaN guard,
and the same losses on sharded meshes of 8 simulated devices as on one device."""

import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest
from training_toys import (
    ToyEncoder,
    ToyMLMIterator,
    enable_compilation_cache,
    restore_compilation_cache,
)

from configs import common
from rope_jax.training import checkpoint, preflight, trainer


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    previous = enable_compilation_cache(tmp_path_factory.mktemp("xla_cache"))
    yield
    restore_compilation_cache(previous)


def toy_config(**overrides):
    config = common.base_config()
    config.update(
        num_train_steps=4,
        log_every_steps=1,
        checkpoint_every_steps=2,
        eval_every_steps=0,
        eval_steps=0,
        batch_size=8,
        measure_matmul_peak=False,
        async_checkpointing=True,
    )
    # decay_steps fixed so runs of different lengths share one schedule.
    config.optimizer.update(warmup_steps=1, learning_rate=3e-3, decay_steps=10)
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def run(workdir, config, iterator=None, devices=None, dropout_rate=0.1):
    iterator = iterator or ToyMLMIterator(config.batch_size)
    return trainer.train_and_evaluate(
        config,
        str(workdir),
        inputs=trainer.Inputs(train=iterator),
        model=ToyEncoder(dropout_rate=dropout_rate),
        devices=devices or jax.devices()[:1],
    )


def losses_of(result):
    return {step: m["loss"] for step, m in result.history.items()}


def test_exact_resume_and_outputs(tmp_path):
    full = run(tmp_path / "full", toy_config())
    first = run(tmp_path / "split", toy_config(num_train_steps=2))
    second = run(tmp_path / "split", toy_config())
    assert sorted(first.history) == [1, 2] and sorted(second.history) == [3, 4]
    # Bit-identical per-step losses (dropout masks, data and optimizer state all resumed).
    assert {**losses_of(first), **losses_of(second)} == losses_of(full)
    for a, b in zip(
        jax.tree.leaves(full.state.params), jax.tree.leaves(second.state.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # metrics.jsonl: one object per logged step with the documented fields; TensorBoard files.
    records = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for field in ("loss", "learning_rate", "grad_norm"):
        assert all(field in r for r in records), field
    # Throughput from the second step on (the first one's time is compilation).
    assert all(r["tokens_per_sec"] > 0 for r in records[1:]) and "tokens_per_sec" not in records[0]
    assert os.listdir(tmp_path / "full" / "tensorboard")
    assert checkpoint.Checkpointer(tmp_path / "full" / "checkpoints").complete_steps() == [2, 4]


def test_zero_periods_log_and_save_only_at_the_end(tmp_path):
    config = toy_config(num_train_steps=3, log_every_steps=0, checkpoint_every_steps=0)
    result = run(tmp_path, config)
    assert sorted(result.history) == [1, 2, 3]
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [3]
    # The time to the first step joins the first record written, here the last step's.
    assert records[0]["compile_seconds"] > 0
    assert checkpoint.Checkpointer(tmp_path / "checkpoints").complete_steps() == [3]


def test_relative_workdir_saves_and_resumes(tmp_path, monkeypatch):
    """``make demo`` passes ``runs/demo-<time>``; Orbax only takes absolute paths."""
    monkeypatch.chdir(tmp_path)
    first = run("runs/relative", toy_config(num_train_steps=2))
    assert checkpoint.Checkpointer(tmp_path / "runs/relative/checkpoints").complete_steps() == [2]
    resumed = run("runs/relative", toy_config())
    assert sorted(resumed.history) == [3, 4] and sorted(first.history) == [1, 2]


def test_interrupted_saves_are_never_restored(tmp_path):
    workdir = tmp_path / "run"
    run(workdir, toy_config())
    ckpt = workdir / "checkpoints"
    # A save killed mid-write leaves Orbax's temporary directory ...
    shutil.copytree(ckpt / "4", ckpt / "6.orbax-checkpoint-tmp-1234")
    # ... and a step directory damaged after the fact lacks its commit markers.
    shutil.copytree(ckpt / "4", ckpt / "8")
    os.remove(ckpt / "8" / "commit_success.txt")
    os.remove(ckpt / "8" / "state" / "_METADATA")
    resumed = run(workdir, toy_config(num_train_steps=5))
    assert sorted(resumed.history) == [5]  # resumed from step 4, the last complete one
    assert (ckpt / "8.incomplete").exists()
    assert not (ckpt / "6.orbax-checkpoint-tmp-1234").exists()
    reference = run(tmp_path / "reference", toy_config(num_train_steps=5))
    assert resumed.history[5]["loss"] == reference.history[5]["loss"]


def test_damaged_checkpoint_gives_clear_error(tmp_path):
    workdir = tmp_path / "run"
    result = run(workdir, toy_config(num_train_steps=2))
    state_dir = workdir / "checkpoints" / "2" / "state"
    for root, _, files in os.walk(state_dir):
        for name in files:
            if "ocdbt" in root or root.endswith("/d"):
                open(os.path.join(root, name), "wb").close()
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints")
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), result.state
    )
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints/2"):
        ckpt.restore(2, abstract)
    with pytest.raises(checkpoint.CheckpointError, match="No checkpoint for step 7"):
        ckpt.restore(7, abstract)
    ckpt.close()


def test_each_process_resumes_its_own_input_position(tmp_path, monkeypatch):
    """Orbax writes the JSON data item from the primary host only; every process's iterator
    state must still come back to that process (they read different document shards)."""
    assert checkpoint.gather_data_states({"index": 3, "open": [1, 2]}) == [
        {"index": 3, "open": [1, 2]}
    ]
    per_process = [{"index": 5, "open": [7, 8]}, {"index": 6, "open": []}]
    monkeypatch.setattr(checkpoint, "gather_data_states", lambda state: per_process)
    monkeypatch.setattr(checkpoint, "_process_index_and_count", lambda: (0, 2))
    ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
    state = {"w": jax.numpy.arange(4.0)}
    ckpt.save(1, state, per_process[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    for index in (0, 1):
        monkeypatch.setattr(checkpoint, "_process_index_and_count", lambda i=index: (i, 2))
        restored, data_state = ckpt.restore(1, abstract)
        assert data_state == per_process[index]
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(4.0))
    # Another number of processes reads other shards: no saved position applies.
    monkeypatch.setattr(checkpoint, "_process_index_and_count", lambda: (0, 1))
    assert ckpt.restore(1, abstract)[1] is None
    ckpt.close()


def test_row_stream_states_merge_into_one_item_any_process_count_resumes(tmp_path, monkeypatch):
    """The document pipeline's states (disjoint rows) are saved as one global state, which
    every process of any count restores; states equal on all processes stay one state."""
    per_process = [
        {"row_streams": {"0": {"document": 1}, "1": {"document": 2}}},
        {"row_streams": {"2": {"document": 0}, "3": {"document": 4}}},
    ]
    merged = {"row_streams": {str(r): {"document": d} for r, d in enumerate([1, 2, 0, 4])}}
    assert checkpoint.merged_data_state(per_process) == merged
    assert checkpoint.merged_data_state([{"step": 3}, {"step": 3}]) == {"step": 3}
    overlapping = [per_process[0], per_process[0] | {"x": 1}]
    assert checkpoint.PER_PROCESS in checkpoint.merged_data_state(overlapping)
    monkeypatch.setattr(checkpoint, "gather_data_states", lambda state: per_process)
    monkeypatch.setattr(checkpoint, "_process_index_and_count", lambda: (0, 2))
    ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
    state = {"w": jax.numpy.arange(4.0)}
    ckpt.save(1, state, per_process[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    saved = json.loads((tmp_path / "1" / checkpoint.DATA / "metadata").read_text())
    assert saved == merged
    for index, count in [(0, 1), (1, 2), (3, 4)]:
        monkeypatch.setattr(checkpoint, "_process_index_and_count", lambda i=index, n=count: (i, n))
        assert ckpt.restore(1, abstract)[1] == merged
    ckpt.close()


class _SigtermAfter(ToyMLMIterator):
    """Delivers SIGTERM to this process when batch ``at`` is fetched (a preemption notice)."""

    def __init__(self, batch_size, at):
        super().__init__(batch_size)
        self.at = at

    def __next__(self):
        if self.index == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().__next__()


def test_sigterm_saves_and_resume_continues(tmp_path):
    workdir = tmp_path / "run"
    config = toy_config(num_train_steps=6, checkpoint_every_steps=100)
    stopped = run(workdir, config, iterator=_SigtermAfter(8, at=3))
    assert stopped.stopped_by_signal
    last = max(stopped.history)
    assert checkpoint.Checkpointer(workdir / "checkpoints").complete_steps() == [last]
    resumed = run(workdir, config)
    assert sorted(resumed.history) == list(range(last + 1, 7))
    reference = run(tmp_path / "reference", config)
    assert {**losses_of(stopped), **losses_of(resumed)} == losses_of(reference)


def test_nan_guard_stops_and_keeps_last_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(trainer.NonFiniteLossError, match=r"Non-finite loss .* at step 3"):
        run(workdir, toy_config(num_train_steps=6, debug_nan_step=2))
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints")
    assert ckpt.complete_steps() == [2]
    ckpt.close()
    # The checkpoint restores and training continues from it (the NaN was only at step 3).
    resumed = run(workdir, toy_config(num_train_steps=4))
    assert sorted(resumed.history) == [3, 4]
    assert all(np.isfinite(m["loss"]) for m in resumed.history.values())


@pytest.fixture(scope="module")
def one_device_losses(tmp_path_factory):
    config = toy_config(num_train_steps=3, checkpoint_every_steps=0, batch_size=16)
    # No dropout: microbatches draw their own masks, so accumulation changes them.
    return losses_of(run(tmp_path_factory.mktemp("one"), config, dropout_rate=0.0))


@pytest.mark.parametrize(
    "mesh",
    [dict(data=8), dict(data=2, fsdp=4, accum=2), dict(data=2, fsdp=2, tensor=2)],
    ids=["data8", "fsdp4-data2-accum2", "tensor2-fsdp2-data2"],
)
def test_sharded_meshes_match_one_device(tmp_path, mesh, one_device_losses):
    """Same losses as one device; with grad_accum_steps=2 too, since the loss and gradient
    are token-weighted over the whole batch however it is split."""
    assert len(jax.devices()) == 8, "conftest should simulate 8 CPU devices"
    config = toy_config(num_train_steps=3, checkpoint_every_steps=0, batch_size=16)
    config.optimizer.grad_accum_steps = mesh.pop("accum", 1)
    sizes = {"data": 1, "fsdp": 1, "tensor": 1, **mesh}
    config.mesh.update(sizes)
    sharded = run(tmp_path, config, devices=jax.devices(), dropout_rate=0.0)
    got = losses_of(sharded)
    assert got.keys() == one_device_losses.keys()
    for key, value in got.items():
        assert value == pytest.approx(one_device_losses[key], rel=1e-5), key

    # Rules: vocab -> tensor, embed -> fsdp, mlp -> tensor; each device holds its block only.
    params = sharded.state.params

    def local_shape(array):
        return array.addressable_shards[0].data.shape

    vocab, embed = params["embedding"].shape
    assert local_shape(params["embedding"]) == (vocab // sizes["tensor"], embed // sizes["fsdp"])
    embed, mlp = params["wi"]["kernel"].shape
    assert local_shape(params["wi"]["kernel"]) == (embed // sizes["fsdp"], mlp // sizes["tensor"])
    assert local_shape(params["final_norm"]["scale"]) == (embed // sizes["fsdp"],)
    assert local_shape(params["wi"]["bias"]) == (mlp,)  # no axis names: replicated
    # Adam's moments follow their params.
    mu = sharded.state.opt_state[0].mu
    assert mu["wi"]["kernel"].sharding == params["wi"]["kernel"].sharding


class _FiniteIterator(ToyMLMIterator):
    """The toy batches, ending after ``num_batches`` (a finite ``data.num_epochs``)."""

    def __init__(self, batch_size, num_batches):
        super().__init__(batch_size)
        self.num_batches = num_batches

    def __next__(self):
        if self.index >= self.num_batches:
            raise StopIteration
        return super().__next__()


def test_data_that_runs_out_ends_the_run_saved_and_a_rerun_says_so(tmp_path):
    config = toy_config(num_train_steps=6, checkpoint_every_steps=0)
    result = run(tmp_path, config, _FiniteIterator(config.batch_size, 3))
    assert result.stop_signal is None
    assert sorted(result.history) == [1, 2, 3]  # steps 1-3 trained, then the data ran out
    assert int(jax.device_get(result.state.step)) == 3
    assert checkpoint.Checkpointer(tmp_path / "checkpoints").latest_step() == 3
    with pytest.raises(preflight.ConfigError, match="checkpoint at step 3 has read all"):
        run(tmp_path, config, _FiniteIterator(config.batch_size, 3))
    assert checkpoint.Checkpointer(tmp_path / "checkpoints").latest_step() == 3


def test_data_without_one_batch_is_a_config_error(tmp_path):
    config = toy_config()
    with pytest.raises(preflight.ConfigError, match="does not fill one batch"):
        run(tmp_path, config, _FiniteIterator(config.batch_size, 0))


def test_finite_epochs_on_several_processes_is_refused_before_any_work():
    config = toy_config()
    config.data.num_epochs = 2
    trainer._check_epochs_on_processes(config, 1)  # one process: fine
    with pytest.raises(preflight.ConfigError, match="data.num_epochs=2 with 2 processes"):
        trainer._check_epochs_on_processes(config, 2)
    config.data.num_epochs = None
    trainer._check_epochs_on_processes(config, 2)  # repeating input: fine
