"""Experiments that train many pretraining runs and compare them (the top floor: they use
``training`` and the models, nothing uses them). ``ablation``: position encoding x
attention kernel, loss by position at and beyond the training length."""
