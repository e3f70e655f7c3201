"""Dense projections: the contraction and bias add with their gradients, and fused projections.

Every matmul weight of the models goes through :func:`dense_contract` and every bias through
:func:`add_bias`. Both have the forward of the plain ``dot_general`` / broadcast add; what
differs is the backward, written out so that it compiles to products the backends run well:

- the weight gradient is formed as ``dout^T @ x`` (outputs first) and transposed, which is
  the same sum; left to autodiff, XLA's CPU backend transposed the large output gradient
  instead (for T5's gated-GELU input projection a ``[1024, 4096]`` copy fused into the
  activation's backward, about 8 % of a T5-small step on 2 cores);
- the bias gradient is ``ones @ dout``, a matrix-vector product, instead of the reduce
  ``sum(dout, axis=leading)``, which jaxlib 0.10's CPU backend runs as an unvectorised loop
  (0.17 s for the MLM output bias over ``[8, 512, 32000]`` logits, and ~400 MB of
  transient memory).

Gradients accumulate in float32 and are cast back to the operand dtypes (bfloat16 compute,
float32 storage), as autodiff does.

Projections of the same input (q/k/v of self-attention, k/v of cross-attention, T5's
``wi_0``/``wi_1``) run as one matmul over their kernels stacked at compute time
(:func:`fused_projections`): one larger GEMM in the forward, one for the input gradient
(``[N, 3HD] @ [3HD, E]`` instead of three products and two sums), one for the weight
gradient. The parameters stay separate (``query/kernel``, ``key/kernel``, ...), so
checkpoints, Hugging Face conversion and sharding annotations are unchanged; stacking a
few MB of weights per layer costs little next to the activations. Flaxformer and MaxText
fuse q/k/v the same way (``fused_qkv``), there with a fused parameter.

Inside a decoding loop (:func:`decoding_loop`) the projections multiply by row-major copies of
their transposed kernels on CPU (:func:`contract`): one token per sequence makes each
projection a matrix-vector product, whose time is the read of its kernel.

Every projection's output is named ``scanning.PROJECTION`` (``checkpoint_name``, the identity
outside remat): remat's dots policies cannot see a ``dot_general`` inside a ``custom_vjp``,
so they save the projections by this name (``rope_jax.scanning``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.extend.core
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental.layout import Layout, with_layout_constraint

from rope_jax.scanning import PROJECTION

Initializer = Callable[..., jax.Array]


def dense_init(cfg, in_axes: Sequence[int], out_axes: Sequence[int], scale=1.0):
    """BERT-style N(0, initializer_range) or T5-style fan-in truncated-normal init
    (``cfg``: the model config)."""
    if cfg.initializer_range > 0:
        return nn.initializers.normal(stddev=cfg.initializer_range * scale)
    return nn.initializers.variance_scaling(
        scale, "fan_in", "truncated_normal", in_axis=tuple(in_axes), out_axis=tuple(out_axes)
    )


def constrain(x, names):
    """Activation sharding hint; a no-op unless logical axis rules are in context."""
    return nn.with_logical_constraint(x, names)


def lead(v, ndim):
    """``v`` with leading unit axes up to ``ndim`` (explicit broadcasting, no rank promotion)."""
    return v.reshape((1,) * (ndim - v.ndim) + v.shape)


@jax.custom_vjp
def add_bias(x, bias):
    """``x + bias`` over x's trailing axes (``bias.shape == x.shape[-bias.ndim:]``).

    The bias gradient is ``ones_N @ dout_NF`` (module docstring), accumulated in float32 and
    cast to the bias dtype: the same sum in another order.
    """
    return x + lead(bias.astype(x.dtype), x.ndim)


def _add_bias_fwd(x, bias):
    # Only the bias's shape and dtype are needed: a zero-size stand-in carries them.
    return add_bias(x, bias), jnp.zeros((0,) * bias.ndim, bias.dtype)


def _add_bias_bwd(bias_like, dout):
    bias_shape = dout.shape[dout.ndim - bias_like.ndim :]
    dout_NF = dout.reshape(-1, math.prod(bias_shape))
    ones_N = jnp.ones((dout_NF.shape[0],), dout.dtype)
    dbias_F = jnp.einsum("N,NF->F", ones_N, dout_NF, preferred_element_type=jnp.float32)
    return dout, dbias_F.reshape(bias_shape).astype(bias_like.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def dense_contract(x, kernel, num_contract: int = 1, float32_output: bool = False):
    """Contracts x's trailing ``num_contract`` axes with the kernel's leading ones.

    ``x [..., *in]``, ``kernel [*in, *out]`` -> ``[..., *out]`` in x's dtype, or accumulated
    and returned in float32 with ``float32_output`` (output logits). Gradients as in the
    module docstring.
    """
    x_axes = tuple(range(x.ndim - num_contract, x.ndim))
    return lax.dot_general(
        x,
        kernel,
        ((x_axes, tuple(range(num_contract))), ((), ())),
        preferred_element_type=jnp.float32 if float32_output else None,
    )


def _dense_contract_fwd(x, kernel, num_contract, float32_output):
    return dense_contract(x, kernel, num_contract, float32_output), (x, kernel)


def _dense_contract_bwd(num_contract, float32_output, residuals, dout):
    x, kernel = residuals
    in_size = math.prod(kernel.shape[:num_contract])
    out_size = math.prod(kernel.shape[num_contract:])
    x_NK = x.reshape(-1, in_size)
    dout_NM = dout.reshape(-1, out_size).astype(x.dtype)
    kernel_KM = kernel.reshape(in_size, out_size).astype(x.dtype)
    dx_NK = jnp.einsum("NM,KM->NK", dout_NM, kernel_KM, preferred_element_type=jnp.float32)
    dkernel_MK = jnp.einsum("NM,NK->MK", dout_NM, x_NK, preferred_element_type=jnp.float32)
    return (
        dx_NK.reshape(x.shape).astype(x.dtype),
        dkernel_MK.T.reshape(kernel.shape).astype(kernel.dtype),
    )


dense_contract.defvjp(_dense_contract_fwd, _dense_contract_bwd)


def _trace_state():
    """An opaque token of the innermost JAX trace (equal tokens: the same trace)."""
    return jax.extend.core.get_opaque_trace_state(convention="flax")


def _row_major_transpose(kernel_KM):
    return with_layout_constraint(kernel_KM.T, Layout(major_to_minor=(0, 1)))


@dataclasses.dataclass
class LoopKernels:
    """The ``[M, K]`` kernel copies that :func:`contract` multiplies by in one traced decoding
    step, in the order of the calls (see :func:`decoding_loop`).

    given: copies made before the call (``decoding_loop(kernels)``), used in call order
      instead of being made from the kernels; None: made from the kernels in the trace.
    made: the copies the step used, in call order. A product traced inside a nested
      transform of the step (``nn.scan`` over layers, remat) makes its copy there and is
      not listed: its kernel is that transform's value.
    """

    given: tuple | None
    trace: Any
    made: list = dataclasses.field(default_factory=list)

    def kernel_MK(self, kernel_KM):
        if _trace_state() != self.trace:
            return _row_major_transpose(kernel_KM)
        if self.given is None:
            kernel_MK = _row_major_transpose(kernel_KM)
        else:
            index = len(self.made)
            want = (kernel_KM.shape[::-1], kernel_KM.dtype)
            have = self.given[index] if index < len(self.given) else None
            if have is None or (have.shape, have.dtype) != want:
                raise ValueError(
                    f"decoding_loop: product {index} of the step needs a {want[0]} {want[1]} "
                    f"kernel copy, the given copies have "
                    f"{'none' if have is None else (have.shape, have.dtype)} there: they were "
                    f"made for another model or configuration; make them with "
                    f"decoding_loop() on this step."
                )
            kernel_MK = self.given[index]
        self.made.append(kernel_MK)
        return kernel_MK

    def check_complete(self):
        """Raises unless the step used every given copy."""
        if self.given is not None and len(self.made) != len(self.given):
            raise ValueError(
                f"decoding_loop: the step used {len(self.made)} of the {len(self.given)} "
                f"given kernel copies: they were made for another model or configuration."
            )


_IN_DECODING_LOOP = contextvars.ContextVar("rope_jax_in_decoding_loop", default=None)


@contextlib.contextmanager
def decoding_loop(kernels: Sequence[jax.Array] | None = None) -> Iterator[LoopKernels]:
    """Marks the model calls traced inside it as the body of a decoding loop.

    ``rope_jax.decoding`` traces its step function under it. There a projection multiplies a
    few rows (one token per sequence or beam) by its whole kernel, and its time is the read
    of the kernel from memory. On XLA's CPU backend that read streams faster when each
    output's weights are contiguous, ``[M, K]``, than from the stored ``[K, M]`` (``x @ W``
    accumulates all M outputs for each input row instead of reducing one contiguous row
    per output): with T5-small's decoder weights and output layer (154 MB), 14.7-15.1
    against 16.3-17.6 ms per step in alternating stand-alone loops, 2 cores. So under this
    context :func:`contract` multiplies by a row-major copy of the transposed kernel.

    The copies depend only on the parameters. Made in the trace (``kernels=None``), XLA's
    loop-invariant code motion moves them out of the ``while`` loop, so they are made once
    per decoding call (``tests/test_decoding.py`` checks the compiled loop has no
    transposed kernel in it); the yielded :class:`LoopKernels` lists them in call order
    (``.made``). ``kernels``: copies made earlier, by a trace of the same step under this
    context returning ``.made``, used instead (``rope_jax.decoding.generate`` keeps them
    across calls with the same parameters: made in each call, T5-small's 154 MB of copies
    took about 0.15 s of it).
    """
    loop = LoopKernels(None if kernels is None else tuple(kernels), _trace_state())
    token = _IN_DECODING_LOOP.set(loop)
    try:
        yield loop
    finally:
        _IN_DECODING_LOOP.reset(token)


def contract(x, kernel, num_contract: int = 1, float32_output: bool = False):
    """:func:`dense_contract`; inside :func:`decoding_loop` on CPU, the same product by a
    row-major ``[M, K]`` copy of the kernel (see there). Either way the result is
    ``x [..., *in] . kernel [*in, *out]``, in x's dtype or float32 (``float32_output``)."""
    loop = _IN_DECODING_LOOP.get()
    if loop is None or jax.default_backend() != "cpu":
        return dense_contract(x, kernel, num_contract, float32_output)
    in_shape, out_shape = kernel.shape[:num_contract], kernel.shape[num_contract:]
    kernel_KM = kernel.reshape(math.prod(in_shape), math.prod(out_shape))
    kernel_MK = loop.kernel_MK(kernel_KM)
    x_NK = x.reshape(-1, kernel_KM.shape[0])
    out_NM = jnp.einsum(
        "NK,MK->NM",
        x_NK,
        kernel_MK,
        preferred_element_type=jnp.float32 if float32_output else None,
    )
    return out_NM.reshape(x.shape[: x.ndim - num_contract] + tuple(out_shape))


class DenseGeneral(nn.Module):
    """Contracts the trailing ``contract`` axes of x with a kernel ``[*in, *features]``.

    ``kernel_axes`` names every kernel axis (input axes first); the bias, if any, is named
    by the output names.
    """

    features: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    kernel_init: Initializer
    contract: int = 1
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    # Accumulate and return float32 (output logits) instead of the compute dtype.
    float32_output: bool = False

    @nn.compact
    def __call__(self, x):
        in_shape = x.shape[-self.contract :]
        kernel_shape = tuple(in_shape) + tuple(self.features)
        if len(self.kernel_axes) != len(kernel_shape):
            raise ValueError(
                f"{self.name}: kernel_axes {self.kernel_axes} do not name kernel shape "
                f"{kernel_shape}."
            )
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
            kernel_shape,
            self.param_dtype,
        )
        out = contract(
            x.astype(self.dtype), kernel.astype(self.dtype), self.contract, self.float32_output
        )
        out_dtype = jnp.float32 if self.float32_output else self.dtype
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(
                    nn.initializers.zeros_init(), self.kernel_axes[self.contract :]
                ),
                tuple(self.features),
                self.param_dtype,
            )
            out = add_bias(out.astype(out_dtype), bias)
        return checkpoint_name(out.astype(out_dtype), PROJECTION)


class Projection(nn.Module):
    """A one-axis-in DenseGeneral whose input width is known up front (``in_features``).

    Its ``kernel`` ``[in_features, *features]`` and ``bias`` ``[*features]`` exist as soon as
    the module is set up, so :func:`fused_projections` can stack the kernels of several
    projections of one input. Same parameter names, shapes, axes and initialisation as a
    ``DenseGeneral`` at the same path.
    """

    in_features: int
    features: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    kernel_init: Initializer
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        kernel_shape = (self.in_features, *self.features)
        if len(self.kernel_axes) != len(kernel_shape):
            raise ValueError(
                f"{self.name}: kernel_axes {self.kernel_axes} do not name kernel shape "
                f"{kernel_shape}."
            )
        self.kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
            kernel_shape,
            self.param_dtype,
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), self.kernel_axes[1:]),
                tuple(self.features),
                self.param_dtype,
            )

    def __call__(self, x, input_scale=None):
        return fused_projections(x, [self], input_scale=input_scale)[0]


def fused_projections(x, projections: Sequence[Projection], *, input_scale=None) -> list[jax.Array]:
    """``[p(x) for p in projections]`` computed as one matmul over the stacked kernels.

    ``input_scale`` (``[in_features]`` or None): the projections of ``x * input_scale``,
    computed as products of ``x`` with kernels whose input rows are scaled instead. A
    pre-norm block passes its RMS norm's scale here (``layers.RMSNorm.fold_scale``): the
    same products in exact arithmetic, with the scale applied to a few MB of weights rather
    than to every activation (on XLA's CPU backend the activation-sized multiply, in the
    forward and the backward pass, had the scale broadcast into a full activation-sized
    buffer first for each of the fused products that read it).

    The projections must share input width, output shape, bias use and dtypes. Outputs are
    in the compute dtype.
    """
    first = projections[0]
    for other in projections[1:]:
        if (other.in_features, other.features, other.use_bias, other.dtype) != (
            first.in_features,
            first.features,
            first.use_bias,
            first.dtype,
        ):
            raise ValueError(
                f"cannot fuse projections {first.name} and {other.name}: they differ in "
                f"input width, output shape, bias or dtype."
            )
    if x.shape[-1] != first.in_features:
        raise ValueError(
            f"{first.name}: input has {x.shape[-1]} features, the kernel expects "
            f"{first.in_features}."
        )
    dtype = first.dtype

    def kernel_of(p):
        kernel = p.kernel
        if input_scale is not None:
            scale = input_scale.astype(jnp.promote_types(kernel.dtype, input_scale.dtype))
            kernel = kernel * scale.reshape((-1,) + (1,) * (kernel.ndim - 1))
        return kernel.astype(dtype)

    if len(projections) == 1:
        kernel = kernel_of(first)
    else:
        # [E, P, *features]: the stacked axis sits after the contracted one.
        kernel = jnp.stack([kernel_of(p) for p in projections], axis=1)
    out = contract(x.astype(dtype), kernel, 1, False)
    if first.use_bias:
        biases = [p.bias for p in projections]
        out = add_bias(out, biases[0] if len(projections) == 1 else jnp.stack(biases))
    out = checkpoint_name(out, PROJECTION)
    if len(projections) == 1:
        return [out]
    axis = x.ndim - 1
    return [lax.index_in_dim(out, i, axis, keepdims=False) for i in range(len(projections))]


__all__ = [
    "DenseGeneral",
    "Projection",
    "add_bias",
    "contract",
    "decoding_loop",
    "dense_contract",
    "fused_projections",
    "lead",
]
