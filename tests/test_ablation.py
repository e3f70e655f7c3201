"""The ablation runner on a 2-run grid of a few steps, and its pure pieces."""

import json
import os

import numpy as np

from rope_jax.evaluation import ablation


def _config(tmp_path):
    from configs import ablation as ablation_config

    config = ablation_config.get_config("tiny")
    corpus = tmp_path / "corpus.txt"
    text = " ".join(f"word{i % 37} and more text number {i}." for i in range(400))
    corpus.write_text("\n\n".join([text[k : k + 900] for k in range(0, len(text), 900)]))
    config.corpus = str(corpus)
    config.heldout_every = 3
    config.train_length = 16
    config.eval_windows = 4
    config.eval_batch_size = 4
    config.kernels = ("softmax", "linear")
    config.positions = ("rope_interpolation", "alibi", "learned")  # tests narrow this
    config.model.update({"d_model": 32, "num_heads": 2, "d_ff": 64, "num_layers": 1})
    config.train.num_train_steps = 3
    config.train.batch_size = 4
    config.train.log_every_steps = 1
    config.train.optimizer.warmup_steps = 1
    return config


def test_grid_skips_pairs_the_model_rejects(tmp_path):
    config = _config(tmp_path)
    config.kernels = ("softmax", "nystrom", "linear")
    config.positions = ("rope", "alibi")
    cells = {c.name: c for c in ablation.grid(config)}
    assert not cells["softmax_rope"].skip_reason and not cells["linear_rope"].skip_reason
    assert "causal" in cells["nystrom_rope"].skip_reason
    assert cells["linear_alibi"].skip_reason
    assert cells["softmax_alibi"].skip_reason == ""


def test_window_iterator_resumes_exactly_and_buckets():
    tokens = np.arange(100, dtype=np.int32) + 3
    it = ablation.WindowIterator(tokens, length=8, batch_size=2, seed=1)
    next(it)
    state = it.get_state()
    second = next(it)
    it.set_state(state)
    np.testing.assert_array_equal(next(it)["input_tokens"], second["input_tokens"])
    np.testing.assert_array_equal(second["target_tokens"], second["input_tokens"] + 1)
    assert ablation.bucket_means(np.array([1.0, 3.0, 5.0, 7.0, 9.0]), 2) == [2.0, 6.0, 9.0]


def test_learned_table_is_not_evaluated_beyond_its_rows(tmp_path):
    config = _config(tmp_path)
    cells = {c.name: c for c in ablation.grid(config)}
    assert ablation.eval_model_dict(cells["softmax_learned"], 16, 16)["max_length"] == 16
    assert ablation.eval_model_dict(cells["softmax_learned"], 16, 32) is None
    interpolated = ablation.eval_model_dict(cells["softmax_rope_interpolation"], 16, 64)
    assert interpolated["rope_scale"] == 0.25 and interpolated["max_length"] == 16


def test_two_run_grid_writes_table_json_and_plots(tmp_path):
    config = _config(tmp_path)
    config.kernels = ("softmax",)
    config.positions = ("rope", "rope_interpolation")
    config.eval_multipliers = (1, 2)
    workdir = str(tmp_path / "ablation")
    results = ablation.run_ablation(config, workdir)
    runs = results["runs"]
    # rope_interpolation shares the rope training run: 1 training for the 2 runs.
    assert os.listdir(os.path.join(workdir, "runs")) == ["softmax_rope"]
    assert runs["softmax_rope_interpolation"]["trained_as"] == "softmax_rope"
    rope = runs["softmax_rope"]["lengths"]
    interpolated = runs["softmax_rope_interpolation"]["lengths"]
    # Same weights and no scaling at the training length; other positions beyond it.
    assert rope["16"]["mean_loss"] == interpolated["16"]["mean_loss"]
    assert rope["32"]["mean_loss"] != interpolated["32"]["mean_loss"]
    assert len(rope["32"]["position_losses"]) == 32 and len(rope["32"]["bucket_losses"]) == 8
    assert np.isclose(np.mean(rope["32"]["bucket_losses"]), rope["32"]["mean_loss"])
    with open(os.path.join(workdir, "ablation.json")) as f:
        assert json.load(f)["runs"].keys() == runs.keys()
    table = open(os.path.join(workdir, "ablation.md")).read()
    assert "| softmax | rope_interpolation (= softmax_rope) |" in table
    for name in runs:
        assert os.path.getsize(os.path.join(workdir, "plots", f"{name}.png")) > 1000
