"""The ablation experiment: its cells are real pretraining configs, its numbers are
aggregated over seeds, and its figures show the JSON's numbers. One mini grid of two steps
(the causal track, one trained cell, two seeds) is shared by the end-to-end tests; the mlm
track's cells are checked as configs (each training compiles a step and an init: seconds)."""

import itertools
import json
import os

import numpy as np
import pytest

from configs import common
from rope_jax.experiments import ablation, ablation_grid, ablation_measure, ablation_plots
from rope_jax.training import evaluators, trainer


def _config(corpus_dir):
    from configs import ablation as ablation_config

    config = ablation_config.get_config("tiny")
    corpus = corpus_dir / "corpus.txt"
    text = " ".join(f"word{i % 37} and more text number {i}." for i in range(400))
    corpus.write_text("\n\n".join([text[k : k + 900] for k in range(0, len(text), 900)]))
    config.train.data.update(
        {"paths": str(corpus), "format": "text", "text_mode": "blocks", "eval_every": 3}
    )
    config.train.data.inputs_length = 16
    config.eval_windows = 4
    config.eval_batch_size = 4
    config.kernels = ("softmax", "linear")
    config.positions = ("rope_interpolation", "alibi", "learned")  # tests narrow this
    config.train.model.update({"d_model": 32, "num_heads": 2, "d_ff": 64, "num_layers": 1})
    config.train.model.num_landmarks = 4
    config.train.num_train_steps = 3
    config.train.batch_size = 4
    config.train.log_every_steps = 1
    config.train.optimizer.warmup_steps = 1
    return config


@pytest.fixture(scope="module")
def mini_grid(tmp_path_factory):
    """Two seeds of causal softmax x (rope, rope_interpolation) (nystrom skipped: the heat
    map's blank row): 2 runs of 2 steps (rope_interpolation evaluates rope's weights),
    evaluated at 1x and 4x L (the heat map's columns); the seeds compile once."""
    from training_toys import enable_compilation_cache, restore_compilation_cache

    previous = enable_compilation_cache(tmp_path_factory.mktemp("xla_cache"))
    tmp_path = tmp_path_factory.mktemp("ablation")
    config = _config(tmp_path)
    config.tracks = ("causal_lm",)
    config.num_seeds = 2
    config.train.num_train_steps = 2
    config.eval_multipliers = (1, 4)
    # Nystrom has no causal form: its causal row is the heat map's blank (hatched) cells.
    config.kernels = ("softmax", "nystrom")
    config.positions = ("rope", "rope_interpolation")
    workdir = str(tmp_path / "ablation")
    try:
        yield config, workdir, ablation.run_ablation(config, workdir)
    finally:
        restore_compilation_cache(previous)


def test_grid_skips_pairs_the_model_rejects(tmp_path):
    config = _config(tmp_path)
    config.kernels = ("softmax", "nystrom", "linear")
    config.positions = ("rope", "alibi")
    cells = {c.name: c for c in ablation_grid.grid(config)}
    assert not cells["softmax_rope"].skip_reason and not cells["linear_rope"].skip_reason
    assert "causal" in cells["nystrom_rope"].skip_reason
    assert cells["linear_alibi"].skip_reason
    assert cells["softmax_alibi"].skip_reason == ""
    # Bidirectional: Nystrom takes part; a bias still needs a kernel that forms scores.
    mlm = {c.name: c for c in ablation_grid.grid(config, "mlm")}
    assert mlm["nystrom_rope"].skip_reason == "" and mlm["softmax_alibi"].skip_reason == ""
    assert mlm["nystrom_rope"].config.model.family == "encoder"
    assert mlm["nystrom_rope"].config.data.objective == "mlm"
    assert "additive bias" in mlm["nystrom_alibi"].skip_reason
    config.mlm.kernels = ("nystrom",)
    assert [c.name for c in ablation_grid.grid(config, "mlm")] == ["nystrom_rope", "nystrom_alibi"]
    config.train.model.num_landmarks = 32  # more landmarks than the 16 tokens at L
    with pytest.raises(ValueError, match="num_landmarks=32"):
        ablation_grid.grid(config, "mlm")


def test_cell_configs_are_complete_pretraining_configs(tmp_path):
    config = _config(tmp_path)
    config.positions = ("rope_interpolation", "learned_hierarchical", "alibi")
    cells = {c.name: c for c in ablation_grid.grid(config)}
    interpolated = cells["softmax_rope_interpolation"]
    # Evaluation-only variants train as the variant they derive from.
    assert interpolated.train_key == "softmax_rope"
    assert (
        interpolated.config.to_dict()
        == ablation_grid.cell_config(config, "causal_lm", "softmax", "rope").to_dict()
    )
    assert cells["softmax_learned_hierarchical"].config.model.position == "learned"
    run = ablation_grid.seeded(cells["softmax_alibi"], 5)
    assert run.seed == 5 and cells["softmax_alibi"].config.seed == 0
    model, cfg = trainer.build_model(run)
    assert (cfg.family, cfg.attention, cfg.position, cfg.max_length) == (
        "decoder",
        "softmax",
        "alibi",
        16,
    )
    assert run.data.objective == "causal_lm" and run.data.sampling == "windows"


def test_learned_table_is_not_evaluated_beyond_its_rows(tmp_path):
    config = _config(tmp_path)
    cells = {c.name: c for c in ablation_grid.grid(config)}
    assert ablation_grid.eval_model_dict(cells["softmax_learned"], 16)["max_length"] == 16
    assert ablation_grid.eval_model_dict(cells["softmax_learned"], 32) is None
    interpolated = ablation_grid.eval_model_dict(cells["softmax_rope_interpolation"], 64)
    assert interpolated["rope_scale"] == 0.25 and interpolated["max_length"] == 16


def test_eval_batches_are_prefixes_of_one_masked_batch():
    from rope_jax.data import windows
    from rope_jax.data.byte_tokenizer import ByteTokenizer

    tokenizer = ByteTokenizer()
    data = np.arange(3 * 41, dtype=np.int32).reshape(3, 41) + 3
    kwargs = {"tokenizer": tokenizer, "mlm_rate": 0.15}
    causal = ablation_measure.eval_batches("causal_lm", data, [10, 40], seed=0, **kwargs)
    for length in (10, 40):
        expected = windows.window_batch(data[:, : length + 1], "causal_lm")
        for key in expected:
            np.testing.assert_array_equal(causal[length][key], expected[key])
    masked = ablation_measure.eval_batches("mlm", data, [10, 20, 40], seed=7, **kwargs)
    again = ablation_measure.eval_batches("mlm", data, [10, 20, 40], seed=7, **kwargs)
    np.testing.assert_array_equal(np.sum(masked[40]["loss_weights"], axis=1), [6, 6, 6])
    np.testing.assert_array_equal(masked[40]["target_tokens"], data[:, :40])
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
    assert ablation_measure.bucket_losses(sums, counts, 2) == pytest.approx([31 / 3, 3.0, 50.0])

    def reference(width):  # mean over the (window, position) pairs that are targets
        buckets = []
        for start in range(0, losses.shape[1], width):
            picked = losses[:, start : start + width][weights[:, start : start + width] > 0]
            buckets.append(float(picked.mean()) if picked.size else None)
        return buckets

    for width in (1, 2, 3, 5):
        assert ablation_measure.bucket_losses(sums, counts, width) == pytest.approx(
            reference(width)
        )
    assert ablation_measure.bucket_losses(sums, counts, 1)[3] is None  # never masked
    # The loop's loss-by-position evaluator computes the same measure with the same function.
    assert ablation_measure.bucket_losses is evaluators.bucket_means
    summary = ablation_measure.length_summary(sums, counts, 2, 2)
    assert summary["mean_loss"] == pytest.approx(reference(5)[0])
    assert summary["loss_beyond_train_length"] == pytest.approx((3 + 50) / 2)
    assert summary["num_targets"] == 5


def test_seed_aggregation_matches_numpy():
    losses = np.array([[2.0, 3.5, None], [2.5, 3.0, 4.0], [1.0, 4.5, 6.0]], dtype=object)
    per_seed = [
        {
            "mean_loss": row[0],
            "loss_beyond_train_length": row[1],
            "num_targets": 7,
            "range_losses": list(row[1:]),
            "bucket_losses": list(row),
            "position_losses": list(row),
        }
        for row in losses
    ]
    out = ablation_measure.aggregate_lengths(per_seed)
    first = np.array([2.0, 2.5, 1.0])
    assert out["mean_loss"] == pytest.approx(first.mean())
    assert out["mean_loss_std"] == pytest.approx(np.std(first, ddof=1))
    assert (out["mean_loss_min"], out["mean_loss_max"]) == (1.0, 2.5)
    assert out["num_seeds"] == 3 and out["num_targets"] == 7
    # A bucket without a value in one seed averages the others, and says n.
    assert out["bucket_losses"][2] == pytest.approx(5.0)
    assert out["bucket_losses_std"][2] == pytest.approx(np.std([4.0, 6.0], ddof=1))
    assert out["bucket_losses_n"] == [3, 3, 2]
    assert out["range_losses_std"][0] == pytest.approx(np.std([3.5, 3.0, 4.5], ddof=1))
    one = ablation_measure.aggregate([1.5])
    assert one == {"mean": 1.5, "std": None, "min": 1.5, "max": 1.5, "n": 1}
    assert ablation_measure.aggregate([None])["n"] == 0


def test_mini_grid_writes_tables_json_and_figures_over_seeds(mini_grid):
    config, workdir, results = mini_grid
    runs = results["tracks"]["causal_lm"]["runs"]
    # rope_interpolation shares the rope training runs: 1 training per seed for the 2 cells.
    assert os.listdir(os.path.join(workdir, "runs", "causal_lm")) == ["softmax_rope"]
    assert sorted(os.listdir(os.path.join(workdir, "runs", "causal_lm", "softmax_rope"))) == [
        "seed0",
        "seed1",
    ]
    assert runs["softmax_rope_interpolation"]["trained_as"] == "softmax_rope"
    rope, interpolated = runs["softmax_rope"], runs["softmax_rope_interpolation"]
    # Same weights and no scaling at the training length; other positions beyond it.
    assert rope["lengths"]["16"]["mean_loss"] == interpolated["lengths"]["16"]["mean_loss"]
    assert rope["lengths"]["64"]["mean_loss"] != interpolated["lengths"]["64"]["mean_loss"]
    # Over seeds: the JSON's mean and std are those of the per-seed numbers.
    per_seed = [rope["seeds"][s]["lengths"]["64"]["mean_loss"] for s in ("0", "1")]
    assert per_seed[0] != per_seed[1]
    assert rope["lengths"]["64"]["mean_loss"] == pytest.approx(np.mean(per_seed))
    assert rope["lengths"]["64"]["mean_loss_std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert rope["num_seeds"] == 2 and len(rope["lengths"]["64"]["bucket_losses"]) == 16
    assert "causal" in runs["nystrom_rope"]["skipped"]

    with open(os.path.join(workdir, "ablation.json")) as f:
        saved = json.load(f)
    assert saved["tracks"]["causal_lm"]["runs"].keys() == runs.keys()
    table = open(os.path.join(workdir, "ablation.md")).read()
    assert "## Track `causal_lm`: next-token loss" in table
    mean, std = rope["lengths"]["16"]["mean_loss"], rope["lengths"]["16"]["mean_loss_std"]
    assert f"| {mean:.3f} ± {std:.3f} |" in table
    assert "| softmax | rope_interpolation (= softmax_rope) |" in table
    plots = os.path.join(workdir, "plots")
    assert sorted(os.listdir(plots)) == ["causal_lm_heatmap.png", "causal_lm_softmax.png"]
    assert all(os.path.getsize(os.path.join(plots, name)) > 1000 for name in os.listdir(plots))


def test_heatmap_shows_the_json_values(mini_grid, tmp_path):
    _, workdir, results = mini_grid
    with open(os.path.join(workdir, "ablation.json")) as f:
        saved = json.load(f)
    section = saved["tracks"]["causal_lm"]
    path, drawn = ablation_plots.plot_heatmap(saved, section, str(tmp_path))
    assert os.path.getsize(path) > 1000 and sorted(drawn) == [1, 4]
    kernels, positions = ["softmax", "nystrom"], ["rope", "rope_interpolation"]
    for multiple, array in drawn.items():
        expected = np.full((2, 2), np.nan)
        for (i, kernel), (j, position) in itertools.product(
            enumerate(kernels), enumerate(positions)
        ):
            entry = section["runs"][f"{kernel}_{position}"].get("lengths", {})
            if "mean_loss" in entry.get(str(16 * multiple), {}):
                expected[i, j] = entry[str(16 * multiple)]["mean_loss"]
        np.testing.assert_array_equal(array, expected)
    assert np.isnan(drawn[4][1]).all() and np.isfinite(drawn[4][0]).all()  # nystrom: blank


def test_recorded_cell_config_rebuilds_the_cells_model(mini_grid):
    """train.py with a run's recorded config resumes that run: same experiment (the
    workdir contract compares every key), the checkpoint restores into the model built
    from it (same parameter tree and shapes), and that model gives the ablation's loss."""
    import jax

    config, workdir, results = mini_grid
    for track, name in (("causal_lm", "softmax_rope_interpolation"),):
        run = results["tracks"][track]["runs"][name]
        entry = run["seeds"]["1"]
        recorded = common.from_record(entry["config"])
        _, cfg = trainer.build_model(recorded)
        trained_as = ablation_grid.TRAINED_AS.get(run["position"], run["position"])
        assert (cfg.attention, cfg.position, cfg.max_length) == (run["kernel"], trained_as, 16)
        assert cfg.family == ablation_grid.TRACKS[track].family and recorded.seed == 1
        run_dir = os.path.dirname(entry["config"])
        result = trainer.train_and_evaluate(recorded, run_dir, devices=jax.devices()[:1])
        assert int(result.state.step) == config.train.num_train_steps
        cell = next(c for c in ablation_grid.grid(config, track) if c.name == name)
        variables = {"params": jax.device_get(result.state.params)}
        if result.state.random_features:
            variables["random_features"] = jax.device_get(result.state.random_features)
        from rope_jax.data import windows
        from rope_jax.data.byte_tokenizer import ByteTokenizer

        documents = trainer.build_corpus(recorded)
        held_out = windows.token_stream(documents, ByteTokenizer(), eval_every=3, held_out=True)
        data = windows.eval_windows(held_out, 16 * 4 + 1, config.eval_windows)
        batches = ablation_measure.eval_batches(
            cell.config.data.objective,
            data,
            [16, 64],
            seed=config.mlm.eval_mask_seed,
            tokenizer=ByteTokenizer(),
            mlm_rate=0.15,
        )
        lengths = ablation._evaluate(cell, variables, batches, config, 4)
        for length in ("16", "64"):
            if "skipped" in entry["lengths"][length]:
                assert lengths[length] == entry["lengths"][length]
                continue
            assert lengths[length]["mean_loss"] == pytest.approx(
                entry["lengths"][length]["mean_loss"], rel=1e-6
            )


def test_mlm_cell_records_rebuild_its_model(tmp_path):
    """The mlm track's cells are complete configs too: what a run records (``config.json``)
    builds the cell's encoder again, with the MLM objective on windows."""
    from rope_jax.training import workdir as workdir_lib

    config = _config(tmp_path)
    config.mlm.kernels = ("nystrom",)
    config.positions = ("rope", "rope_interpolation")
    cells = {c.name: c for c in ablation_grid.grid(config, "mlm")}
    for name, trained_as in (("nystrom_rope", "rope"), ("nystrom_rope_interpolation", "rope")):
        run = ablation_grid.seeded(cells[name], 1)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(workdir_lib.as_plain_dict(run)))
        recorded = common.from_record(str(path))
        assert workdir_lib.as_plain_dict(recorded) == workdir_lib.as_plain_dict(run)
        _, cfg = trainer.build_model(recorded)
        assert cfg == trainer.build_model(run)[1]
        assert (cfg.family, cfg.attention, cfg.position, cfg.max_length) == (
            "encoder",
            "nystrom",
            trained_as,
            16,
        )
        assert (recorded.data.objective, recorded.data.sampling, recorded.seed) == (
            "mlm",
            "windows",
            1,
        )
