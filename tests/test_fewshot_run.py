"""End-to-end tiny few-shot runs through the shared train loop, one per method, each on a
classification task (RTE) and a multiple-choice task (COPA): PET with its auxiliary MLM loss
over two seeds (outputs and the seeds table), P-tuning with the LM frozen (every non-prompt
parameter bit-identical after training).

The data is chosen so RTE and COPA give arrays of one shape (2 candidates, one row each,
at most 3 byte tokens: "Yes"/"No" and "abc"/"de"), so each method compiles its train
step and evaluation programs once for both tasks; each run is shared by the tests below it.
"""

import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util
from test_fewshot_scoring import ByteCodec

from rope_jax.evaluation import cloze, fewshot, pretrained, readers

TASKS = ("RTE", "COPA")


def _write(root, task, split, rows):
    folder = root / task
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _data(root):
    labels = ("entailment", "not_entailment")
    rte = [{"premise": f"s {i}.", "hypothesis": f"t{i % 3}", "label": labels[i % 2], "idx": i}
           for i in range(8)]  # fmt: skip
    copa = [{"premise": f"q{i}.", "choice1": "Abc", "choice2": "De", "question": "cause",
             "label": i % 2, "idx": i} for i in range(8)]  # fmt: skip
    for task, rows in (("RTE", rte), ("COPA", copa)):
        _write(root, task, "train", rows)
        _write(root, task, "dev32", rows[:4])
    _write(root, "RTE", "val", rte[4:])  # RTE: selected on dev32, reported on val


def _config(data, method):
    from configs import fewshot as fewshot_config

    config = fewshot_config.get_config("tiny")
    config.task, config.method, config.data_dir = "all", method, str(data)
    config.num_train_steps, config.eval_every_steps, config.checkpoint_every_steps = 2, 2, 2
    config.batch_size, config.eval_batch_size, config.max_input_length = 4, 4, 32
    config.model.update({"vocab_size": 260, "d_model": 16, "head_dim": 8, "d_ff": 32,
                         "max_length": 32, "dropout_rate": 0.0})  # fmt: skip
    config.dropout_rate = 0.0
    # The SuperGLUE evaluator only (held_out_loss is the loop's generic evaluator, tested
    # with SuperGLUE fine-tuning): one program fewer per task and seed.
    config.evaluators = [("superglue", None, {})]
    return config


def _load(config):
    cfg = pretrained._model_config(config.model)
    return pretrained.Source(cfg, None, None, ByteCodec(), "random init")


def _run(tmp_path_factory, method, **overrides):
    root = tmp_path_factory.mktemp(method)
    _data(root / "data")
    config = _config(root / "data", method)
    config.update(overrides)
    workdir = str(root / "run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pretrained, "load_source", _load)
        by_seed = fewshot.run_fewshot(config, workdir, devices=jax.devices()[:1])
    return config, workdir, by_seed


@pytest.fixture(scope="module")
def pet_run(tmp_path_factory):
    # Two seeds for the table; PET's auxiliary MLM loss on an encoder.
    return _run(tmp_path_factory, "pet", num_seeds=2, pet_alpha=0.5)


@pytest.fixture(scope="module")
def ptuning_run(tmp_path_factory):
    # dropout_rate None: the model's own (0.0 here), the path a pretrained checkpoint takes.
    return _run(
        tmp_path_factory, "ptuning", freeze_lm=True, prompt_encoder="mlp", dropout_rate=None
    )


def _check_outputs(workdir, results):
    with open(os.path.join(workdir, "metrics.json")) as f:
        assert json.load(f) == results
    assert sorted(results) == ["COPA", "RTE", "RTE/dev32"]
    for name, split in (("RTE", "val"), ("RTE/dev32", "dev32"), ("COPA", "dev32")):
        task = name.split("/")[0]
        assert results[name]["num_examples"] == 4 and 0 <= results[name]["accuracy"] <= 1
        path = os.path.join(workdir, "predictions", f"{task}_{split}.jsonl")
        lines = [json.loads(x) for x in open(path)]
        assert len(lines) == 4 and all(x["label"] in readers.LABEL_NAMES[task] for x in lines)
    for task in TASKS:
        assert results[task]["final_train_loss"] > 0


def test_pet_writes_each_seeds_metrics_and_predictions(pet_run):
    _, workdir, by_seed = pet_run
    assert sorted(by_seed) == [0, 1]
    for seed, results in by_seed.items():
        _check_outputs(os.path.join(workdir, f"seed_{seed}"), results)


def test_pet_seeds_table_is_the_mean_and_std_over_seeds(pet_run):
    _, workdir, by_seed = pet_run
    with open(os.path.join(workdir, "fewshot.json")) as f:
        summary = json.load(f)["summary"]
    for task in TASKS:
        scores = [100 * by_seed[s][task]["score"] for s in (0, 1)]
        assert summary[task]["score"]["mean"] == pytest.approx(np.mean(scores))
        assert summary[task]["score"]["std"] == pytest.approx(np.std(scores, ddof=1))
    average = [np.mean([100 * by_seed[s][t]["score"] for t in TASKS]) for s in (0, 1)]
    assert summary["average"]["mean"] == pytest.approx(np.mean(average))
    table = open(os.path.join(workdir, "fewshot.md")).read()
    assert "| RTE (Acc.) |" in table and "COPA (Acc.)" in table and "±" in table


def _leaves(tree):
    return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def test_ptuning_writes_metrics_and_predictions(ptuning_run):
    _, workdir, results = ptuning_run
    _check_outputs(workdir, results[0])


@pytest.mark.parametrize("task", TASKS)
def test_ptuning_with_the_lm_frozen_changes_only_the_prompts(ptuning_run, task):
    config, workdir, _ = ptuning_run
    _, initial, _ = fewshot.build_task(task, config, _load(config))
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


def test_seeds_table_numbers():
    """fewshot_report on made-up scores: mean and sample std (ddof=1) x100, per task and for
    the per-seed average of the task scores."""
    from rope_jax.evaluation import fewshot_report

    cb = [(0.5, 0.25), (0.75, 0.5), (1.0, 0.5)]
    copa = [0.6, 0.4, 0.5]
    by_seed = {
        seed: {
            "CB": {"accuracy": acc, "f1": f1, "score": (acc + f1) / 2},
            "COPA": {"accuracy": copa[seed], "score": copa[seed]},
        }
        for seed, (acc, f1) in enumerate(cb)
    }
    summary = fewshot_report.summarize(by_seed)
    assert summary["CB"]["f1"]["mean"] == pytest.approx(125 / 3)
    assert summary["CB"]["accuracy"]["std"] == pytest.approx(25.0)  # ddof=1: sqrt(1250 / 2)
    assert summary["COPA"]["accuracy"]["std"] == pytest.approx(10.0)
    average = [(37.5 + 60) / 2, (62.5 + 40) / 2, (75 + 50) / 2]
    assert summary["average"]["mean"] == pytest.approx(np.mean(average))
    assert summary["average"]["std"] == pytest.approx(np.std(average, ddof=1))
    table = fewshot_report.markdown(summary, "pet", 3)
    assert "| 75.0 ±25.0 / 41.7 ±14.4 | 50.0 ±10.0 |" in table


def _split_config(root, eval_split="auto"):
    from configs import fewshot as fewshot_config

    config = fewshot_config.get_config("tiny")
    config.task, config.data_dir, config.eval_split = "RTE", str(root), eval_split
    return config


def _found(caplog):
    """The one line the split choice logged (absl logs through the ``absl`` logger)."""
    (line,) = [r.getMessage() for r in caplog.records if "eval_split=auto" in r.getMessage()]
    caplog.clear()
    return line


def test_auto_evaluation_splits_select_on_dev32_and_report_val(tmp_path, caplog):
    from rope_jax.evaluation import splits

    caplog.set_level("INFO")
    _data(tmp_path)
    (rte,) = splits.read_run_splits(_split_config(tmp_path))
    assert [(e.name, e.data.split) for e in rte.evaluations] == [
        ("RTE", "val"),
        ("RTE/dev32", "dev32"),
    ]
    assert rte.select.data.split == "dev32"
    assert _found(caplog) == (
        f"RTE: eval_split=auto found dev32.jsonl and val.jsonl in {tmp_path / 'RTE'}; "
        "selecting (best checkpoint) on dev32, reporting val"
    )
    (tmp_path / "RTE" / "val.jsonl").unlink()  # FewGLUE as shipped: train and dev32
    (rte,) = splits.read_run_splits(_split_config(tmp_path))
    assert [(e.name, e.data.split) for e in rte.evaluations] == [("RTE", "dev32")]
    assert rte.select.name == "RTE"
    assert _found(caplog).endswith(
        f"found dev32.jsonl in {tmp_path / 'RTE'} (no val.jsonl); selecting (best "
        "checkpoint) on dev32, reporting dev32"
    )
    (tmp_path / "RTE" / "val.jsonl").write_text((tmp_path / "RTE" / "dev32.jsonl").read_text())
    (tmp_path / "RTE" / "dev32.jsonl").unlink()
    (rte,) = splits.read_run_splits(_split_config(tmp_path))
    assert [(e.name, e.data.split) for e in rte.evaluations] == [("RTE", "val")]
    assert "found val.jsonl" in _found(caplog)
    (tmp_path / "RTE" / "val.jsonl").unlink()
    with pytest.raises(FileNotFoundError) as error:
        splits.read_run_splits(_split_config(tmp_path))
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / "RTE") in message
    assert "neither dev32 nor val" in message and "files there: train.jsonl" in message


def test_a_named_evaluation_split_that_is_missing_names_the_folder_and_its_files(tmp_path):
    from rope_jax.evaluation import splits

    _data(tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        splits.read_run_splits(_split_config(tmp_path, "test"))
    message = str(error.value)
    assert "\n" not in message and message.startswith("RTE test split not found")
    assert f"RTE test split not found: {tmp_path / 'RTE' / 'test.jsonl'} (" in message
    assert "files there: dev32.jsonl, train.jsonl, val.jsonl" in message
