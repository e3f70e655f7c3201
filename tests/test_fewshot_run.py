"""End-to-end tiny few-shot runs through the shared train loop: PET and P-tuning on a
classification task (CB) and a multiple-choice task (COPA); with the LM frozen, every
non-prompt parameter is bit-identical after training; the seeds table."""

import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util
from test_fewshot_scoring import ByteCodec

from rope_jax.evaluation import cloze, fewshot, pretrained, readers


def _write(root, task, split, rows):
    folder = root / task
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _data(root):
    labels = ("entailment", "contradiction", "neutral")
    cb = [{"premise": f"s {i}.", "hypothesis": f"t{i % 3}", "label": labels[i % 3], "idx": i}
          for i in range(8)]  # fmt: skip
    copa = [{"premise": f"q{i}.", "choice1": "Ab", "choice2": "Cd", "question": "cause",
             "label": i % 2, "idx": i} for i in range(8)]  # fmt: skip
    for task, rows in (("CB", cb), ("COPA", copa)):
        _write(root, task, "train", rows)
        _write(root, task, "dev32", rows[:4])


def _config(data, method):
    from configs import fewshot as fewshot_config

    config = fewshot_config.get_config("tiny")
    config.task, config.method, config.data_dir = "all", method, str(data)
    config.num_train_steps, config.eval_every_steps, config.checkpoint_every_steps = 2, 2, 2
    config.batch_size, config.eval_batch_size, config.max_input_length = 4, 4, 32
    config.model.update({"vocab_size": 260, "d_model": 16, "head_dim": 8, "d_ff": 32,
                         "max_length": 32, "dropout_rate": 0.0})  # fmt: skip
    config.dropout_rate = 0.0
    return config


@pytest.fixture
def source(monkeypatch):
    def load(config):
        cfg = pretrained._model_config(config.model)
        return pretrained.Source(cfg, None, None, ByteCodec(), "random init")

    monkeypatch.setattr(pretrained, "load_source", load)
    return load


def _check_outputs(workdir, results):
    with open(os.path.join(workdir, "metrics.json")) as f:
        assert json.load(f) == results
    for task in ("CB", "COPA"):
        assert results[task]["num_examples"] == 4 and 0 <= results[task]["accuracy"] <= 1
        lines = [
            json.loads(x) for x in open(os.path.join(workdir, "predictions", f"{task}_dev32.jsonl"))
        ]
        assert all(x["label"] in readers.LABEL_NAMES[task] for x in lines)


def test_pet_on_cb_and_copa_with_seeds_table(tmp_path, source):
    _data(tmp_path / "data")
    config = _config(tmp_path / "data", "pet")
    config.num_seeds = 2
    config.pet_alpha = 0.5  # PET's auxiliary MLM loss on an encoder
    workdir = str(tmp_path / "run")
    by_seed = fewshot.run_fewshot(config, workdir, devices=jax.devices()[:1])
    assert sorted(by_seed) == [0, 1]
    for seed, results in by_seed.items():
        _check_outputs(os.path.join(workdir, f"seed_{seed}"), results)
    with open(os.path.join(workdir, "fewshot.json")) as f:
        summary = json.load(f)["summary"]
    scores = [100 * by_seed[s]["CB"]["score"] for s in (0, 1)]
    assert summary["CB"]["score"]["mean"] == pytest.approx(np.mean(scores))
    assert summary["CB"]["score"]["std"] == pytest.approx(np.std(scores, ddof=1))
    average = [
        (100 * by_seed[s]["CB"]["score"] + 100 * by_seed[s]["COPA"]["score"]) / 2 for s in (0, 1)
    ]
    assert summary["average"]["mean"] == pytest.approx(np.mean(average))
    table = open(os.path.join(workdir, "fewshot.md")).read()
    assert "| CB (Acc./F1) |" in table and "COPA (Acc.)" in table and "±" in table


def _leaves(tree):
    return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def test_ptuning_with_the_lm_frozen_changes_only_the_prompts(tmp_path, source):
    _data(tmp_path / "data")
    config = _config(tmp_path / "data", "ptuning")
    config.freeze_lm = True
    config.prompt_encoder = "lstm"
    workdir = str(tmp_path / "run")
    results = fewshot.run_fewshot(config, workdir, devices=jax.devices()[:1])[0]
    _check_outputs(workdir, results)
    for task in ("CB", "COPA"):
        _, initial, _ = fewshot.build_task(task, config, source(config))
        trained, _, where = pretrained._restore_params(os.path.join(workdir, task))
        assert where.endswith("/2")
        before, after = _leaves(initial), _leaves(trained)
        assert before.keys() == after.keys()
        prompt_changed = False
        for name, value in before.items():
            new = np.asarray(after[name])
            if name.startswith(cloze.PROMPT_PARAMS):
                prompt_changed |= not np.array_equal(new, value)
            else:
                assert new.dtype == value.dtype
                assert new.tobytes() == np.asarray(value).tobytes(), f"{task}: {name} changed"
        assert prompt_changed, f"{task}: the prompt encoder did not train"
