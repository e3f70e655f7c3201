"""SuperGLUE fine-tuning through the train loop of pretraining: the same losses and
predictions on sharded meshes of 8 simulated devices as on one device (CB text-to-text and
CB with an encoder head), the best validation checkpoint, a SIGTERM-interrupted and resumed
eval.py run equal to an uninterrupted one, and a read-only restore of a pretraining workdir
whose run is mid-save."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import subprocess_env
from test_superglue_finetune import ByteCodec, _config, _fixture_data

from rope_jax import families
from rope_jax.data import embedded
from rope_jax.evaluation import finetune, pretrained, splits
from rope_jax.models import build_model
from rope_jax.training import best as best_lib
from rope_jax.training import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cb_config(data, family, **overrides):
    config = _config(data, family)
    config.task = "CB"
    config.update(
        batch_size=8,
        num_train_steps=4,
        log_every_steps=1,
        eval_every_steps=2,
        checkpoint_every_steps=0,  # the final save only
        # No dropout: the reference is one device, and masks are drawn per device layout.
        dropout_rate=0.0,
    )
    config.update(overrides)
    return config


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _finetune(workdir, data, family, devices, mesh=None):
    config = _cb_config(data, family)
    config.mesh.update({"data": 1, "fsdp": 1, "tensor": 1, **(mesh or {})})
    # A pretrained model as a restore gives it: every array committed to device 0.
    cfg = pretrained._model_config(config.model)
    task = families.for_model(build_model(cfg))
    # An explicit key implementation: run_task sets the default one (config.prng_impl), so a
    # default key here would draw other weights for whichever call comes second.
    key = jax.random.key(7, impl="threefry2x32")
    params = nn.unbox(jax.jit(lambda: task.init(task.init_rngs(key)))())["params"]
    params = jax.device_put(params, jax.devices()[0])
    source = pretrained.Source(cfg, params, {}, ByteCodec(), "pretrained")
    results = finetune.run_task(
        "CB",
        config,
        str(workdir),
        source=source,
        task_splits=splits.read_task_splits("CB", config),
        devices=devices,
    )
    rows = _rows(workdir / "CB" / "metrics.jsonl")
    losses = {row["step"]: row["loss"] for row in rows if "loss" in row}
    scores = {row["step"]: row["superglue/score"] for row in rows if "superglue/score" in row}
    with open(workdir / "predictions" / "CB_val.jsonl") as f:
        predictions = f.read()
    return results, losses, scores, predictions


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    _fixture_data(root)
    return root


@pytest.fixture(scope="module")
def one_device(tmp_path_factory, data):
    runs = {}
    for family in ("encoder_decoder", "encoder"):
        workdir = tmp_path_factory.mktemp(f"one_{family}")
        runs[family] = _finetune(workdir, data, family, jax.devices()[:1])
    return runs


# Both families on the mesh that shards every way (its data axis is data parallelism; pure
# 8-way data parallelism is the pretraining loop's case in test_training_loop.py, and the
# fine-tune differs from it only in its batches, which this mesh shards along `data` too).
@pytest.mark.parametrize(
    "family, mesh",
    [
        ("encoder_decoder", dict(data=2, fsdp=2, tensor=2)),
        ("encoder", dict(data=2, fsdp=2, tensor=2)),
    ],
    ids=["text2text-data2-fsdp2-tensor2", "head-data2-fsdp2-tensor2"],
)
def test_sharded_finetune_matches_one_device(tmp_path, data, one_device, family, mesh):
    assert len(jax.devices()) == 8, "conftest should simulate 8 CPU devices"
    results, losses, scores, predictions = _finetune(tmp_path, data, family, jax.devices(), mesh)
    ref_results, ref_losses, ref_scores, ref_predictions = one_device[family]
    assert sorted(losses) == [1, 2, 3, 4]
    for step, loss in losses.items():
        assert loss == pytest.approx(ref_losses[step], rel=1e-5), step
    assert predictions == ref_predictions
    assert scores == pytest.approx(ref_scores)
    assert results.keys() == ref_results.keys()
    for split, metrics in results.items():
        assert metrics == pytest.approx(ref_results[split], rel=1e-5), split
    # Evaluated at steps 2 and 4; the best is the first step with the highest score, and the
    # final validation metrics are that step's.
    assert sorted(scores) == [2, 4]
    best_step = max(sorted(scores), key=lambda s: scores[s])
    assert results["CB"]["best_step"] == best_step
    assert results["CB"]["score"] == pytest.approx(scores[best_step])
    assert os.path.isdir(tmp_path / "CB" / "checkpoints" / "4")
    assert checkpoint.complete_steps_on_disk(tmp_path / "CB" / "best") == [best_step]


class _State:
    def __init__(self, value):
        self.params = {"w": jnp.full((3,), value, jnp.float32)}
        self.random_features = {}


def test_best_checkpoint_keeps_the_best_step_and_resumes(tmp_path):
    directory = str(tmp_path / "best")
    best = best_lib.BestCheckpoint(directory, "superglue/score")
    offered = [(2, 0.3), (4, 0.7), (6, 0.5), (8, 0.7)]  # a tie later: the earlier step stays
    saved = [best.update(step, _State(step), {"superglue/score": v}) for step, v in offered]
    assert saved == [True, True, False, False]
    assert best.step == 4 and best.value == 0.7
    abstract = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
    params, _ = best.restore(abstract, {})
    np.testing.assert_array_equal(params["w"], 4.0)
    best.close()
    assert checkpoint.complete_steps_on_disk(directory) == [4]
    # A resumed run reads the record: the same evaluation again saves nothing.
    again = best_lib.BestCheckpoint(directory, "superglue/score")
    again.resume(start_step=4)
    assert (again.step, again.value) == (4, 0.7)
    assert not again.update(6, _State(6), {"superglue/score": 0.5})
    assert again.update(10, _State(10), {"superglue/score": 0.9})
    again.close()
    with pytest.raises(KeyError, match="superglue/score.*reported: \\['loss'\\]"):
        best_lib.BestCheckpoint(directory, "superglue/score").update(12, _State(1), {"loss": 1})


# --------------------------------------------------------------- read-only restore


def _tree_digest(root) -> dict[str, str]:
    """Every file's sha256 and every directory (listing included) under ``root``."""
    digest = {}
    for dirpath, dirnames, filenames in os.walk(root):
        relative = os.path.relpath(dirpath, root)
        digest[relative + "/"] = ",".join(sorted(dirnames + filenames))
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                digest[os.path.join(relative, name)] = hashlib.sha256(f.read()).hexdigest()
    return digest


def test_restore_leaves_a_mid_save_pretraining_workdir_byte_identical(tmp_path):
    """A source whose run is still saving: a committed step 2, the temporary directory of a
    save in flight and a step directory without its commit markers yet. Fine-tuning from it
    reads step 2 and changes nothing (a read-write checkpoint manager would delete the
    temporary directory and rename the unfinished step)."""
    config = _cb_config(tmp_path, "encoder_decoder")
    config.model.vocab_size = 512  # the tokenizer's
    cfg = pretrained._model_config(config.model)
    task = families.for_model(build_model(cfg))
    variables = task.init(task.init_rngs(jax.random.key(3)))
    params = nn.unbox(variables)["params"]
    source = tmp_path / "pretrain"
    writer = checkpoint.Checkpointer(source / "checkpoints", async_save=False)
    state = {"params": params, "random_features": {}, "step": jnp.asarray(2)}
    writer.save(2, state, {"index": 2}, force=True)
    writer.close()
    (source / "config.json").write_text(json.dumps({"model": config.model.to_dict()}))
    in_flight = source / "checkpoints" / "4.orbax-checkpoint-tmp-1234567"
    (in_flight / "state").mkdir(parents=True)
    (in_flight / "state" / "partial").write_bytes(b"half a shard")
    unfinished = source / "checkpoints" / "3"
    (unfinished / "state").mkdir(parents=True)
    (unfinished / "state" / "_METADATA").write_text("{}")
    before = _tree_digest(source)

    config.init_checkpoint = str(source)
    documents = ["the sky is blue and the sea is green"] * 20
    embedded.load_or_train_tokenizer(tmp_path / "tok", vocab_size=512, documents=documents)
    config.tokenizer = str(tmp_path / "tok" / "tokenizer" / "spm.model")
    loaded = pretrained.load_source(config)
    assert loaded.description.endswith("checkpoints/2")
    tm = pretrained.load_for_task("CB", config, source=loaded)
    np.testing.assert_array_equal(
        jax.tree.leaves(tm.params)[0], np.asarray(jax.tree.leaves(params)[0])
    )
    assert _tree_digest(source) == before


# ------------------------------------------------------ SIGTERM and resume (eval.py)


def test_sigterm_mid_finetune_then_the_same_command_ends_like_an_uninterrupted_run(tmp_path, data):
    documents = [line for line in open(data / "CB" / "train.jsonl")] * 4
    embedded.load_or_train_tokenizer(tmp_path / "tok", vocab_size=512, documents=documents)
    spm = tmp_path / "tok" / "tokenizer" / "spm.model"
    workdir = tmp_path / "run"
    flags = {
        "task": "CB",
        "data_dir": data,
        "tokenizer": spm,
        "num_train_steps": 8,
        "log_every_steps": 1,
        "eval_every_steps": 4,
        "checkpoint_every_steps": 100,
        "batch_size": 8,
        "max_input_length": 32,
        "prng_impl": "threefry",
    }
    command = [sys.executable, "eval.py", "--config=configs/superglue.py:tiny"]
    command += [f"--config.{key}={value}" for key, value in flags.items()]
    command += [f"--workdir={workdir}"]
    env = subprocess_env.one_device()
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = workdir / "CB" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while process.poll() is None and not (metrics.exists() and len(_rows(metrics)) >= 2):
        assert time.monotonic() < deadline, "the fine-tune logged no steps"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr[-3000:]
    assert "Received SIGTERM: saving a checkpoint" in stderr and "Traceback" not in stderr
    stopped = checkpoint.complete_steps_on_disk(workdir / "CB" / "checkpoints")
    assert len(stopped) == 1 and 2 <= stopped[0] < 8
    assert not (workdir / "metrics.json").exists()

    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Resumed from {workdir / 'CB' / 'checkpoints' / str(stopped[0])}" in done.stderr

    # The uninterrupted reference: the same command in a new workdir (it shares the
    # interrupted runs' compilation cache, so it costs little more than its steps).
    reference_dir = tmp_path / "reference"
    command[-1] = f"--workdir={reference_dir}"
    uninterrupted = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    with open(reference_dir / "metrics.json") as f:
        reference = json.load(f)
    with open(workdir / "metrics.json") as f:
        resumed = json.load(f)
    assert resumed.keys() == reference.keys()
    for split, values in reference.items():
        assert resumed[split] == pytest.approx(values, rel=1e-6), split
    resumed_rows = _rows(metrics)
    reference_rows = _rows(reference_dir / "CB" / "metrics.jsonl")
    assert [r["step"] for r in resumed_rows if "loss" in r] == list(range(1, 9))  # each once
    for name in ("loss", "grad_norm", "superglue/score", "held_out_loss/loss"):
        got = [r[name] for r in resumed_rows if name in r]
        want = [r[name] for r in reference_rows if name in r]
        assert got == pytest.approx(want, rel=1e-6), name
    for name in ("predictions/CB_val.jsonl", "submission/CB.jsonl"):
        assert (workdir / name).read_text() == (reference_dir / name).read_text()
