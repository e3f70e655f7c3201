"""Train state, its sharded initialisation, and the pure train / eval steps.

``train_step(state, batch, rng) -> (state, metrics)`` is one pure function, jitted once with
in/out shardings and the state donated. Gradient accumulation splits the global batch into
``grad_accum_steps`` microbatches inside the step and runs them through ``lax.scan``:

- activations of one microbatch at a time (the point of accumulation), one compiled program,
  no extra optimizer-state buffer (``optax.MultiSteps`` keeps one and needs one host call
  per microbatch);
- the loss is a token-weighted *sum* divided once by the total weight of the whole batch, so
  the accumulated gradient equals the big-batch gradient exactly (up to float reordering),
  even when microbatches hold different numbers of target tokens (averaging per-microbatch
  means, as ``MultiSteps`` does, would not);
- microbatch ``a`` takes rows ``a, a + A, a + 2A, ...``, so each device's share of the batch
  feeds every microbatch and the split needs no cross-device data movement.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rope_jax import families
from rope_jax.training import optim, sharding

RANDOM_FEATURES = families.RANDOM_FEATURES


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data-iterator state.

    ``rng`` is the raw key data of the run's base key (uint32; its shape depends on
    ``jax_default_prng_impl``); each step's key is ``fold_in(base, step)``, so restarting
    at step N reproduces the same dropout masks as an uninterrupted run.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    random_features: Any
    rng: jax.Array


def init_variables(task, example_batch, key):
    """Boxed variables (with logical partition metadata) of the task's model; ``task`` is a
    ``rope_jax.families`` task or a ``rope_jax.models`` module."""
    task = families.as_task(task)
    return task.init(task.init_rngs(key), example_batch)


def _split_variables(variables):
    variables = nn.unbox(variables)
    params = variables["params"]
    random_features = variables.get(RANDOM_FEATURES, {})
    unexpected = set(variables) - {"params", RANDOM_FEATURES}
    if unexpected:
        raise ValueError(
            f"model variables have collections {sorted(unexpected)} the trainer does not "
            f"handle; expected 'params' and optionally '{RANDOM_FEATURES}'."
        )
    return params, random_features


def plan_state(model, tx, example_batch, key, mesh, rules):
    """(abstract state, state shardings, jitted init) without materialising anything.

    ``model``: a ``rope_jax.families`` task or a ``rope_jax.models`` module.

    Shapes come from ``jax.eval_shape``, shardings from the params' logical axis names (the
    optimizer state follows its params); ``init(key)`` builds every shard where it belongs.
    A resumed run restores into the abstract state and never calls ``init``.
    """

    def init_state(k):
        params, random_features = _split_variables(init_variables(model, example_batch, k))
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            random_features=random_features,
            rng=jax.random.key_data(k),
        )

    abstract_variables = jax.eval_shape(lambda k: init_variables(model, example_batch, k), key)
    param_shardings = sharding.logical_shardings(abstract_variables["params"], mesh, rules)
    abstract_state = jax.eval_shape(init_state, key)
    replicated = sharding.replicated(mesh)
    state_shardings = TrainState(
        step=replicated,
        params=param_shardings,
        opt_state=sharding.opt_state_shardings(
            abstract_state.opt_state, abstract_state.params, param_shardings, mesh
        ),
        random_features=jax.tree.map(lambda _: replicated, abstract_state.random_features),
        rng=replicated,
    )
    return abstract_state, state_shardings, jax.jit(init_state, out_shardings=state_shardings)


def create_sharded_state(model, tx, example_batch, key, mesh, rules):
    """(freshly initialised state, state shardings); see ``plan_state``."""
    _, state_shardings, init = plan_state(model, tx, example_batch, key, mesh, rules)
    return init(key), state_shardings


def _microbatches(batch, num_micro: int):
    """``[B, ...] -> [A, B // A, ...]`` taking rows ``a, a + A, ...`` for microbatch ``a``."""

    def split(x):
        rows = x.shape[0]
        return x.reshape((rows // num_micro, num_micro) + x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def make_train_step(
    task,
    tx: optax.GradientTransformation,
    schedule: Callable[[jax.Array], jax.Array],
    *,
    grad_clip_norm: float,
    grad_accum_steps: int = 1,
    z_loss: float = 0.0,
    redraw_features_every: int = 0,
    example_batch: dict | None = None,
    debug_nan_step: int | None = None,
    mlm_max_predictions: int = 0,
) -> Callable:
    """Builds the pure ``train_step(state, batch, rng) -> (state, metrics)``.

    ``task``: a ``rope_jax.families`` task (or a ``rope_jax.models`` module): its
    ``loss_sums`` give the token-weighted sums of a (micro)batch, whatever the family and
    head (LM tokens, classes, candidates). ``mlm_max_predictions > 0`` runs an MLM model's
    output head only at the first that many masked positions per row
    (``families.EncoderTask.predict``); ``metrics["mlm_dropped_tokens"]`` then
    counts masked tokens beyond the cap, which are left out of the loss (0 when the cap
    holds them all, and then the loss is the full head's).

    ``metrics["finite"]`` is 0 when the loss or the gradient norm is NaN/Inf. The loop reads
    every step's metrics before it saves a checkpoint and stops on a non-finite step, so a
    checkpoint never holds the result of one. (Selecting the old state inside the step with
    ``jnp.where`` would cost a pass over params and optimizer state, ~20% of a CPU step.)
    ``debug_nan_step`` (not None) turns that step's loss and gradients into NaN (tests the guard).
    """

    task = families.as_task(task)

    def loss_and_stats(params, random_features, micro, dropout_key):
        stats = task.loss_sums(
            families.variables_of(params, random_features),
            micro,
            deterministic=False,
            rngs={"dropout": dropout_key},
            z_loss=z_loss,
            mlm_max_predictions=mlm_max_predictions,
        )
        return stats["loss_sum"], stats

    grad_fn = jax.value_and_grad(loss_and_stats, has_aux=True)

    def redraw(random_features, key):
        if not random_features or redraw_features_every <= 0 or example_batch is None:
            return random_features
        fresh = _split_variables(init_variables(task, example_batch, key))[1]
        return jax.tree.map(lambda new, old: new.astype(old.dtype), fresh, random_features)

    def train_step(state: TrainState, batch, rng):
        features_key, dropout_key = jax.random.split(rng)
        random_features = state.random_features
        if random_features and redraw_features_every > 0:
            due = (state.step > 0) & (state.step % redraw_features_every == 0)
            random_features = jax.lax.cond(
                due,
                lambda: redraw(state.random_features, features_key),
                lambda: state.random_features,
            )

        if grad_accum_steps == 1:
            (_, stats), grads = grad_fn(state.params, random_features, batch, dropout_key)
        else:
            micro_batches = _microbatches(batch, grad_accum_steps)
            zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)

            def accumulate(carry, inputs):
                grads_acc, stats_acc = carry
                micro, index = inputs
                (_, micro_stats), micro_grads = grad_fn(
                    state.params, random_features, micro, jax.random.fold_in(dropout_key, index)
                )
                grads_acc = jax.tree.map(
                    lambda a, g: a + g.astype(jnp.float32), grads_acc, micro_grads
                )
                stats_acc = jax.tree.map(jnp.add, stats_acc, micro_stats)
                return (grads_acc, stats_acc), None

            zero_stats = {
                k: jnp.zeros((), jnp.float32)
                for k in ("loss_sum", "cross_entropy_sum", "z_loss_sum", "weight_sum")
                + ("correct_sum", "dropped_sum")
            }
            (grads, stats), _ = jax.lax.scan(
                accumulate,
                (zero_grads, zero_stats),
                (micro_batches, jnp.arange(grad_accum_steps)),
            )

        denominator = jnp.maximum(stats["weight_sum"], 1.0)
        loss = stats["loss_sum"] / denominator
        scale = 1.0 / denominator
        if debug_nan_step is not None:
            # A divergence as it happens: loss and every gradient turn NaN, and so do the params.
            poison = jnp.where(state.step == debug_nan_step, jnp.nan, 1.0)
            loss, scale = loss * poison, scale * poison
        grads = jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), grads, state.params)
        grads, grad_norm = optim.clip_by_global_norm(grads, grad_clip_norm)
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = state.replace(
            step=state.step + 1,
            params=new_params,
            opt_state=new_opt_state,
            random_features=random_features,
        )
        metrics = {
            "loss": loss,
            "cross_entropy": stats["cross_entropy_sum"] / denominator,
            "z_loss": stats["z_loss_sum"] / denominator,
            "accuracy": stats["correct_sum"] / denominator,
            "num_target_tokens": stats["weight_sum"],
            "grad_norm": grad_norm,
            "param_norm": optax.tree.norm(state.params),
            "learning_rate": schedule(state.step),
            "finite": finite.astype(jnp.float32),
        }
        if mlm_max_predictions:
            metrics["mlm_dropped_tokens"] = stats["dropped_sum"]
        return new_state, metrics

    return train_step


def make_eval_step(task, *, mlm_max_predictions: int = 0) -> Callable:
    """``eval_step(params, random_features, batch) -> sums`` (deterministic, no dropout).

    ``task`` and ``mlm_max_predictions`` as in ``make_train_step``.
    """
    task = families.as_task(task)

    def eval_step(params, random_features, batch):
        return task.loss_sums(
            families.variables_of(params, random_features),
            batch,
            deterministic=True,
            mlm_max_predictions=mlm_max_predictions,
        )

    return eval_step
