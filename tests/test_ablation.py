"""The ablation runner on a mini grid of a few steps (both tracks), and its pure pieces."""

import json
import os

import numpy as np
import pytest

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
    config.model.num_landmarks = 4
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
    # Bidirectional: Nystrom takes part; a bias still needs a kernel that forms scores.
    mlm = {c.name: c for c in ablation.grid(config, "mlm")}
    assert mlm["nystrom_rope"].skip_reason == "" and mlm["softmax_alibi"].skip_reason == ""
    assert mlm["nystrom_rope"].model_overrides["family"] == "encoder"
    assert "additive bias" in mlm["nystrom_alibi"].skip_reason
    config.mlm.kernels = ("nystrom",)
    assert [c.name for c in ablation.grid(config, "mlm")] == ["nystrom_rope", "nystrom_alibi"]
    config.model.num_landmarks = 32  # more landmarks than the 16 tokens at L
    with pytest.raises(ValueError, match="num_landmarks=32"):
        ablation.grid(config, "mlm")


def test_window_iterators_resume_exactly():
    tokens = np.arange(100, dtype=np.int32) + 3
    it = ablation.WindowIterator(tokens, length=8, batch_size=2, seed=1)
    next(it)
    state = it.get_state()
    second = next(it)
    it.set_state(state)
    np.testing.assert_array_equal(next(it)["input_tokens"], second["input_tokens"])
    np.testing.assert_array_equal(second["target_tokens"], second["input_tokens"] + 1)

    track = ablation.Track("mlm", mask_id=200, random_token_range=(3, 103), mask_rate=0.25)
    it = ablation.WindowIterator(tokens, length=8, batch_size=2, seed=1, track=track)
    next(it)
    second = next(it)
    it.set_state(state)
    again = next(it)
    for key in second:
        np.testing.assert_array_equal(again[key], second[key])
    assert second["input_tokens"].shape == (2, 8)
    np.testing.assert_array_equal(second["loss_weights"].sum(axis=1), [2, 2])
    # Targets are the window itself; only selected positions may differ in the input.
    np.testing.assert_array_equal(np.diff(second["target_tokens"], axis=1), 1)
    changed = second["input_tokens"] != second["target_tokens"]
    assert not (changed & (second["loss_weights"] == 0)).any()


def test_eval_batches_are_prefixes_of_one_masked_batch():
    windows = np.arange(3 * 41, dtype=np.int32).reshape(3, 41) + 3
    causal = ablation.eval_batches(ablation.CAUSAL_LM, windows, [10, 40], seed=0)
    for length in (10, 40):
        expected = ablation.lm_batch(windows[:, : length + 1])
        for key in expected:
            np.testing.assert_array_equal(causal[length][key], expected[key])
    track = ablation.Track("mlm", mask_id=300, random_token_range=(3, 259), mask_rate=0.15)
    masked = ablation.eval_batches(track, windows, [10, 20, 40], seed=7)
    again = ablation.eval_batches(track, windows, [10, 20, 40], seed=7)
    np.testing.assert_array_equal(np.sum(masked[40]["loss_weights"], axis=1), [6, 6, 6])
    np.testing.assert_array_equal(masked[40]["target_tokens"], windows[:, :40])
    for length in (10, 20):
        for key in masked[40]:
            np.testing.assert_array_equal(masked[length][key], masked[40][key][:, :length])
            np.testing.assert_array_equal(masked[length][key], again[length][key])


def test_bucket_losses_average_over_targets_only():
    # Two windows of 5 positions; weights mark the masked (target) positions.
    losses = np.array([[1.0, 2.0, 3.0, 4.0, 5.0], [10.0, 20.0, 30.0, 40.0, 50.0]])
    weights = np.array([[1, 0, 1, 0, 0], [1, 1, 0, 0, 1]])
    sums, counts = (losses * weights).sum(axis=0), weights.sum(axis=0)
    # Buckets {0,1}: (1 + 10 + 20) / 3; {2,3}: 3 / 1; {4}: 50 / 1.
    assert ablation.bucket_losses(sums, counts, 2) == pytest.approx([31 / 3, 3.0, 50.0])

    def reference(width):  # mean over the (window, position) pairs that are targets
        buckets = []
        for start in range(0, losses.shape[1], width):
            picked = losses[:, start : start + width][weights[:, start : start + width] > 0]
            buckets.append(float(picked.mean()) if picked.size else None)
        return buckets

    for width in (1, 2, 3, 5):
        assert ablation.bucket_losses(sums, counts, width) == pytest.approx(reference(width))
    assert ablation.bucket_losses(sums, counts, 1)[3] is None  # position 3: never masked
    summary = ablation.length_summary(sums, counts, 2, 2)
    assert summary["mean_loss"] == pytest.approx(reference(5)[0])
    assert summary["loss_beyond_train_length"] == pytest.approx((3 + 50) / 2)
    assert summary["num_targets"] == 5
    # Causal LM: every position is a target, and a bucket is the plain mean of the curve.
    curve = np.array([1.0, 3.0, 5.0, 7.0, 9.0])
    assert ablation.bucket_losses(curve * 4, np.full(5, 4.0), 2) == [2.0, 6.0, 9.0]


def test_learned_table_is_not_evaluated_beyond_its_rows(tmp_path):
    config = _config(tmp_path)
    cells = {c.name: c for c in ablation.grid(config)}
    assert ablation.eval_model_dict(cells["softmax_learned"], 16, 16)["max_length"] == 16
    assert ablation.eval_model_dict(cells["softmax_learned"], 16, 32) is None
    interpolated = ablation.eval_model_dict(cells["softmax_rope_interpolation"], 16, 64)
    assert interpolated["rope_scale"] == 0.25 and interpolated["max_length"] == 16


def test_mini_grid_of_both_tracks_writes_tables_json_and_plots(tmp_path):
    config = _config(tmp_path)
    config.kernels = ("softmax",)
    config.positions = ("rope", "rope_interpolation")
    config.mlm.kernels = ("nystrom",)
    config.mlm.positions = ("rope",)
    config.eval_multipliers = (1, 2, 4)
    workdir = str(tmp_path / "ablation")
    results = ablation.run_ablation(config, workdir)
    runs = results["tracks"]["causal_lm"]["runs"]
    # rope_interpolation shares the rope training run: 1 training for the 2 runs.
    assert os.listdir(os.path.join(workdir, "runs", "causal_lm")) == ["softmax_rope"]
    assert runs["softmax_rope_interpolation"]["trained_as"] == "softmax_rope"
    rope = runs["softmax_rope"]["lengths"]
    interpolated = runs["softmax_rope_interpolation"]["lengths"]
    # Same weights and no scaling at the training length; other positions beyond it.
    assert rope["16"]["mean_loss"] == interpolated["16"]["mean_loss"]
    assert rope["32"]["mean_loss"] != interpolated["32"]["mean_loss"]
    assert len(rope["32"]["position_losses"]) == 32 and len(rope["32"]["bucket_losses"]) == 8
    assert np.isclose(np.mean(rope["32"]["bucket_losses"]), rope["32"]["mean_loss"])

    mlm = results["tracks"]["mlm"]
    assert mlm["loss"] == "masked-token loss" and mlm["model_family"] == "encoder"
    nystrom = mlm["runs"]["nystrom_rope"]
    assert nystrom["track"] == "mlm" and np.isfinite(nystrom["final_train_loss"])
    assert os.listdir(os.path.join(workdir, "runs", "mlm")) == ["nystrom_rope"]
    for length in ("16", "32", "64"):
        entry = nystrom["lengths"][length]
        assert np.isfinite(entry["mean_loss"]) and entry["num_targets"] > 0
        assert all(np.isfinite(x) for x in entry["range_losses"])
    assert nystrom["lengths"]["64"]["num_targets"] == 10 * results["num_eval_windows"]
    assert np.isfinite(nystrom["lengths"]["64"]["loss_beyond_train_length"])

    with open(os.path.join(workdir, "ablation.json")) as f:
        saved = json.load(f)
    assert saved["tracks"]["causal_lm"]["runs"].keys() == runs.keys()
    assert saved["tracks"]["mlm"]["runs"]["nystrom_rope"]["track"] == "mlm"
    table = open(os.path.join(workdir, "ablation.md")).read()
    assert "## Track `causal_lm`: next-token loss" in table
    assert "## Track `mlm`: masked-token loss" in table
    assert "not comparable across tracks" in table
    assert "| softmax | rope_interpolation (= softmax_rope) |" in table
    assert "| nystrom | rope |" in table.split("## Track `mlm`")[1]
    for name in [f"causal_lm_{name}" for name in runs] + ["mlm_nystrom_rope"]:
        assert os.path.getsize(os.path.join(workdir, "plots", f"{name}.png")) > 1000
