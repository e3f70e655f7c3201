"""The config a train.py run recorded, to train it again (e.g. one ablation cell).

Launch::

  python train.py --workdir=runs/softmax_rope_again \\
      --config=configs/recorded.py:runs/ablation/runs/causal_lm/softmax_rope/seed0/config.json

The argument is a ``config.json`` (or a workdir holding one; its last recorded start
wins). Every key goes through the same checks as an override of ``configs/common.py``'s
defaults: an unknown key or a value of the wrong type is an error naming it.
"""

from configs import common


def get_config(arg: str | None = None):
    if not arg:
        raise ValueError(
            "configs/recorded.py needs the path of a recorded config: "
            "--config=configs/recorded.py:<workdir>/config.json"
        )
    return common.from_record(arg)
