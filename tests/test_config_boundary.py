"""One typed config boundary: each section becomes its dataclass in one place, with the
key named on error; None (not -1/0) is unset; one variant/override parser for every config
file; earlier records' sentinels read as None."""

import json
import os

import ml_collections
import pytest

from configs import ablation, common, decoder, mt5, pegasus, roformer, superglue, t5_pegasus
from rope_jax import config_boundary
from rope_jax.training import optim, sharding, workdir


def test_every_section_becomes_its_dataclass():
    config = decoder.get_config("tiny,attention=performer,pack=False,optimizer.decay_steps=None")
    typed = config_boundary.sections(config)
    assert (typed.model.family, typed.model.attention) == ("decoder", "performer")
    assert (typed.data.batch_size, typed.data.seed, typed.data.pack) == (16, 0, False)
    assert typed.data.targets_length is None and typed.data.num_epochs is None
    assert isinstance(typed.optimizer, optim.OptimizerConfig)
    assert typed.optimizer.decay_steps is None and typed.optimizer.learning_rate == 2e-3
    assert typed.mesh == sharding.MeshConfig(data=-1, fsdp=1, tensor=1)
    assert config.mlm_max_predictions is None and config.debug_nan_step is None


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("optimizer", "learning_rat", 1e-3, "optimizer.learning_rat is not a config key; "
         "did you mean optimizer.learning_rate?"),
        ("optimizer", "decay_steps", "soon", "optimizer.decay_steps must be int, got str 'soon'"),
        ("mesh", "data", 2.5, "mesh.data must be int, got float 2.5"),
        ("model", "num_heads", True, "model.num_heads must be int, got bool True"),
        ("data", "pack", "no", "data.pack must be bool, got str 'no'"),
    ],
)  # fmt: skip
def test_a_bad_key_or_type_in_a_section_names_the_key(section, key, value, message):
    values = decoder.get_config("tiny").to_dict()
    values[section][key] = value  # as a plain dict (e.g. a record) can hold anything
    config = ml_collections.ConfigDict(values)
    with pytest.raises(config_boundary.ConfigKeyError) as raised:
        config_boundary.sections(config)
    assert str(raised.value).startswith(message)


def test_unset_is_none_and_legacy_sentinels_read_as_none(tmp_path):
    config = mt5.get_config("tiny")
    record = workdir.as_plain_dict(config)
    assert record["data"]["targets_length"] is None and record["mlm_max_predictions"] is None
    # What an earlier version recorded for the same config.
    legacy = json.loads(json.dumps(record))
    legacy["data"].update(targets_length=-1, num_epochs=0)
    legacy["model"]["num_decoder_layers"] = 0
    legacy["model"]["remat"] = False  # a boolean before the named remat policies
    del legacy["model"]["scan_layers"]  # layers were always a loop before the option
    legacy["optimizer"]["decay_steps"] = 0
    legacy.update(mlm_max_predictions=-1, debug_nan_step=-1)
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    assert workdir.recorded_config(tmp_path) == record
    assert workdir.plan_resume(config, tmp_path).changes == {}
    # A real value is never taken for a sentinel.
    legacy["data"]["targets_length"] = 64
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    assert workdir.plan_resume(config, tmp_path).changes == {"data.targets_length": (64, None)}


def test_a_record_becomes_the_config_again_and_names_a_bad_key(tmp_path):
    config = roformer.get_config("tiny,num_layers=1")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(workdir.as_plain_dict(config)))
    again = common.from_record(str(path))
    assert workdir.as_plain_dict(again) == workdir.as_plain_dict(config)
    record = workdir.as_plain_dict(config)
    record["model"]["dmodel"] = 64
    path.write_text(json.dumps(record))
    with pytest.raises(KeyError, match="recorded key 'model.dmodel' is not a pretraining"):
        common.from_record(str(path))
    record = workdir.as_plain_dict(config)
    record["optimizer"]["learning_rate"] = "fast"
    path.write_text(json.dumps(record))
    with pytest.raises(TypeError, match="learning_rate must be float, got str 'fast'"):
        common.from_record(str(path))


def test_superglue_and_ablation_parse_variants_like_the_pretraining_configs():
    config = superglue.get_config("tiny,task=RTE,d_model=64,dropout_rate=None,beam_size=2")
    assert (config.task, config.model.d_model, config.beam_size) == ("RTE", 64, 2)
    assert config.dropout_rate is None and config.model.dropout_rate == 0.1  # top level first
    assert config.max_input_length == 64  # the tiny variant
    assert superglue.get_config().max_input_length == 512  # default variant: base
    assert ablation.get_config("tiny,num_seeds=3,train.num_train_steps=5").num_seeds == 3
    with pytest.raises(KeyError, match="no config key 'taks'; did you mean task"):
        superglue.get_config("tiny,taks=CB")
    with pytest.raises(TypeError, match="max_input_length must be int, got str 'long'"):
        superglue.get_config("tiny,max_input_length=long")
    with pytest.raises(ValueError, match=r"unknown variant 'huge'; choose one of \('base', 'tiny'"):
        superglue.get_config("huge")


def test_one_tiny_shrink_for_every_pretraining_config():
    for module in (decoder, mt5, pegasus, roformer, t5_pegasus):
        config = module.get_config("tiny")
        assert (config.data.inputs_length, config.batch_size, config.log_every_steps) == (
            128,
            16,
            50,
        ), module.__name__
    assert pegasus.get_config("tiny").data.targets_length == 64
    assert t5_pegasus.get_config("tiny").num_train_steps == 300
    assert mt5.get_config("tiny").data.targets_length is None


def test_fine_tuning_reads_the_typed_sections_of_every_loop(tmp_path):
    """Fine-tuning gets its mesh and optimizer through the same boundary as pretraining
    (``runner.loop_setup``): a mistyped optimizer key is named before anything is read."""
    from rope_jax.evaluation import finetune
    from rope_jax.training import preflight, runner

    setup = runner.loop_setup(superglue.get_config("tiny,optimizer.decay_steps=None"))
    assert isinstance(setup.optimizer, optim.OptimizerConfig)
    assert setup.optimizer.decay_steps is None and setup.mesh.shape["data"] >= 1
    values = superglue.get_config("tiny").to_dict()
    values["optimizer"]["learning_rat"] = 1e-3
    with pytest.raises(preflight.ConfigError, match="optimizer.learning_rat is not a config key"):
        finetune.run_task("CB", ml_collections.ConfigDict(values), str(tmp_path), task_splits=[1])
    values["optimizer"].pop("learning_rat")
    values["optimizer"]["learning_rate"] = 0.0
    with pytest.raises(preflight.ConfigError, match="optimizer.learning_rate"):
        finetune.run_task("CB", ml_collections.ConfigDict(values), str(tmp_path), task_splits=[1])
    assert os.listdir(tmp_path) == []


def test_evaluator_periods_and_dropout_unset_are_none(tmp_path):
    from rope_jax.evaluation import finetune
    from rope_jax.training import evaluators, preflight

    config = superglue.get_config("tiny")
    assert [spec[1] for spec in config.evaluators] == [None, None]
    builders = {"a": lambda: None, "b": lambda: None, "c": lambda: None}
    specs = [("a", None, {}), ("b", 0, {}), ("c", 3, {})]
    built = evaluators.from_config(specs, builders, default_every=10)
    assert [e.every_steps for e in built] == [10, 0, 3]  # 0: only after the last step
    for every in (-1, True, 2.5):
        with pytest.raises(ValueError, match="every_steps must be None"):
            evaluators.from_config([("a", every, {})], builders, default_every=10)
    finetune.check_dropout_rate(None)
    finetune.check_dropout_rate(0.0)
    with pytest.raises(preflight.ConfigError, match="dropout_rate=-1: .* or None to keep"):
        finetune.check_dropout_rate(-1)
    # A fine-tune recorded with the earlier sentinels resumes as the same experiment.
    record = workdir.as_plain_dict(superglue.get_config("tiny,dropout_rate=None"))
    legacy = json.loads(json.dumps(record))
    legacy.update(dropout_rate=-1, debug_nan_step=-1)
    legacy["evaluators"] = [["superglue", 0, {}], ["held_out_loss", 0, {}]]
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    assert workdir.recorded_config(tmp_path) == record


def test_fewshot_pattern_and_prompt_rate_unset_are_none(tmp_path):
    """``pattern_id`` None = each task's first pattern, ``prompt_learning_rate`` None = the
    optimizer's rate (formerly -1 and 0); bad values are named at start; old records read
    the sentinels as None."""
    from configs import fewshot as fewshot_config
    from rope_jax.evaluation import fewshot, pvp
    from rope_jax.training import preflight

    config = fewshot_config.get_config("tiny,method=ptuning,freeze_lm=True")
    assert config.pattern_id is None and config.prompt_learning_rate == 3e-3
    assert fewshot.pattern_of(config, "RTE") == pvp.default_pattern_id("RTE", "ptuning") == 1
    fewshot.check_config(config)
    prompts = type("Prompts", (), {"num_prompts": 2})()
    # freeze_lm: the schedule returned is the prompts'.
    assert fewshot.make_optimizer(config, prompts)[1](0) == pytest.approx(3e-3)
    config = fewshot_config.get_config("tiny,method=ptuning,freeze_lm=True,task=WiC,pattern_id=3,"
                                       "prompt_learning_rate=None")  # fmt: skip
    assert fewshot.pattern_of(config, "WiC") == 3 and config.prompt_learning_rate is None
    fewshot.check_config(config)
    assert fewshot.make_optimizer(config, prompts)[1](0) == pytest.approx(1e-3)  # optimizer's
    with pytest.raises(TypeError, match="pattern_id"):
        fewshot_config.get_config("tiny,pattern_id=first")
    for key, value, message in [
        ("pattern_id", -1, "pattern_id=-1: give a pattern number .* or None for each task's"),
        ("prompt_learning_rate", 0.0, "prompt_learning_rate=0.0: give a positive rate, or None"),
        ("pet_alpha", 1.5, r"pet_alpha=1.5 must be in \[0, 1\]"),
        ("dropout_rate", -1.0, "dropout_rate=-1.0: give a rate in"),
    ]:
        bad = fewshot_config.get_config("tiny")
        bad[key] = value
        with pytest.raises(preflight.ConfigError, match=message):
            fewshot.check_config(bad)
    with pytest.raises(preflight.ConfigError, match="RTE has no pet pattern_id 9; choose one of"):
        fewshot.check_config(fewshot_config.get_config("tiny,pattern_id=9"))
    # A run recorded with the earlier sentinels resumes as the same experiment.
    record = workdir.as_plain_dict(fewshot_config.get_config("tiny,prompt_learning_rate=None"))
    legacy = json.loads(json.dumps(record))
    legacy.update(pattern_id=-1, prompt_learning_rate=0)
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    assert workdir.recorded_config(tmp_path) == record
    legacy.update(pattern_id=2, prompt_learning_rate=0.01)  # real values stay
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    assert workdir.recorded_config(tmp_path)["pattern_id"] == 2
    assert workdir.recorded_config(tmp_path)["prompt_learning_rate"] == 0.01
