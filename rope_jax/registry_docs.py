"""``docs/kernels.md``, generated from the attention-kernel and position-encoding registries.

``python -m rope_jax.registry_docs > docs/kernels.md`` writes it; a test checks that the file
in the repository is what the registries say, so the table cannot drift from the code.
"""

from __future__ import annotations

from rope_jax.attention.registry import KERNELS
from rope_jax.position_encodings import POSITION_ENCODINGS


def _yes(value: bool, reason: str = "") -> str:
    return "yes" if value else ("no" + (f" ({reason})" if reason else ""))


def _fields(fields) -> str:
    return "<br>".join(
        f"`{field.name}` = {field.default!r}"
        + (f" ({' / '.join(map(str, field.choices))})" if field.choices else "")
        + f": {field.doc}"
        for field in fields
    )


def kernel_table() -> list[str]:
    lines = [
        "| kernel | what | masks | causal | bias | packed rows | cross | RoPE | decoding |"
        " variables | config fields | ablation |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, spec in KERNELS.items():
        traits = spec.traits
        masks = "any [B, H, T, S]" if traits.full_mask else "key padding + causal"
        if traits.segments:
            masks += " + segment ids"
        decoding = "recurrent state" if spec.recurrent else "key/value cache"
        if not traits.causal:
            decoding = "none"
        variables = "<br>".join(
            f"`{variable.name}` ({variable.collection})" for variable in spec.variables
        )
        why = spec.why_not.get
        lines.append(
            f"| `{name}` | {spec.summary} | {masks} | {_yes(traits.causal, why('causal', ''))}"
            f" | {_yes(traits.bias)} | {_yes(traits.packed, why('packed', ''))}"
            f" | {_yes(traits.cross, why('cross', ''))} | {traits.rope}"
            f" | {decoding} | {variables} | {_fields(spec.config_fields)}"
            f" | {_yes(spec.ablation)} |"
        )
    return lines


def position_table() -> list[str]:
    lines = [
        "| position | kind | what | beyond the training length | config fields |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, spec in POSITION_ENCODINGS.items():
        lines.append(
            f"| `{name}` | {spec.kind} | {spec.summary} | {spec.beyond_training}"
            f" | {_fields(spec.config_fields)} |"
        )
    return lines


def render() -> str:
    """The whole of ``docs/kernels.md``."""
    return "\n".join(
        [
            "# Attention kernels and position encodings",
            "",
            "Generated from `rope_jax/attention/registry.py` and",
            "`rope_jax/position_encodings.py` by `python -m rope_jax.registry_docs >",
            "docs/kernels.md` (a test checks it is current). A kernel is chosen by",
            "`model.attention` (and `decoder_attention`, `cross_attention`), a position",
            "encoding by `model.position`; their config fields are `model.<field>`.",
            "",
            "Masks: full-mask kernels take any boolean mask (packed segments, prefix LM); the",
            "others take key padding, `causal=True` and, where listed, packed-row segment ids.",
            "RoPE: `inputs` = q and k are rotated before the kernel; `kernel` = the kernel",
            "rotates (linear attention: `rope_recipe`); `none` = no q.k logits to rotate.",
            "Variables: `params` are trained; `random_features` are drawn at init and redrawn",
            "every `redraw_features_every` steps.",
            "",
            "## Attention kernels",
            "",
            *kernel_table(),
            "",
            "## Position encodings",
            "",
            *position_table(),
            "",
        ]
    )


if __name__ == "__main__":
    print(render(), end="")
