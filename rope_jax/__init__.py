"""rope_jax: pretraining and ablation of position encodings and attention in JAX/Flax.

Floors (imports only point down):
  1. pure math and data functions: ``attention/``, ``positions.py``, ``objectives.py``
  2. shells: ``layers.py``, ``models.py``; the input pipeline ``data/``
  3. what uses a model: ``convert.py``, ``decoding.py``, ``training/``
  4. ``evaluation/``; on top ``train.py``, ``eval.py``, ``configs/``.

Shape letters used in names and einsum strings across the package:
  B batch, T query length, S key/value length, L length when T == S,
  H heads, D head dim, E model dim, F mlp dim, V vocab, M random features or landmarks,
  N relative-position buckets.
"""

__version__ = "0.1.0"
