"""The kernel and position-encoding registries: what the shells read from them is
consistent, and docs/kernels.md is what they say."""

import dataclasses
import pathlib

from rope_jax import registry_docs
from rope_jax.attention.registry import KERNELS
from rope_jax.attention.spec import KernelTraits
from rope_jax.model_config import ModelConfig
from rope_jax.position_encodings import POSITION_ENCODINGS

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_docs_kernel_table_is_generated_from_the_registries():
    written = (ROOT / "docs" / "kernels.md").read_text()
    assert written == registry_docs.render(), (
        "docs/kernels.md is stale: python -m rope_jax.registry_docs > docs/kernels.md"
    )


def test_every_declared_config_field_is_a_model_config_field_with_its_default():
    defaults = {field.name: field.default for field in dataclasses.fields(ModelConfig)}
    specs = [*KERNELS.values(), *POSITION_ENCODINGS.values()]
    for spec in specs:
        for field in spec.config_fields:
            assert defaults[field.name] == field.default, (spec.name, field.name)
        if hasattr(spec, "hyperparameters"):
            declared = {field.name for field in spec.config_fields}
            assert set(spec.hyperparameters.values()) <= declared, spec.name


def test_reasons_name_traits_that_are_false():
    trait_names = {field.name for field in dataclasses.fields(KernelTraits)}
    for spec in KERNELS.values():
        for trait in spec.why_not:
            value = getattr(spec.traits, trait)
            assert trait in trait_names and value in (False, "none"), (spec.name, trait)
        recurrent = spec.recurrent
        if recurrent is not None:
            assert spec.traits.causal, spec.name
