"""Small pieces shared by the ViT and ResNet definitions.

Every parameter is created through `logical(init, names)` so that it carries logical axis names;
the one table of rules in the parallel code maps those names onto mesh axes. Names used by the
models: 'embed', 'mlp', 'heads', 'kv', 'classes', 'pos', 'conv_in', 'conv_out', 'norm'. An axis
named None is never sharded (used for tiny axes such as 3 RGB input channels, which would not
divide over a mesh axis).
"""

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax

Initializer = Callable[..., jax.Array]


def logical(init: Initializer, names: Sequence[str | None]) -> Initializer:
  """Wraps an initializer so that the parameter carries logical axis names.

  Args:
    init: a `jax.nn.initializers` function.
    names: one logical name (or None) per parameter axis.

  Returns:
    An initializer producing an `nn.LogicallyPartitioned` box.
  """
  return nn.with_logical_partitioning(init, tuple(names))


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example.

  Attributes:
    rate: probability of dropping the branch of one example.
  """
  rate: float = 0.

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Args: x (B, ...). Returns x zeroed for dropped examples, rescaled by 1/(1-rate)."""
    if not train or self.rate == 0.:
      return x
    # One Bernoulli draw per example: broadcast the mask over every other axis.
    return nn.Dropout(self.rate, broadcast_dims=tuple(range(1, x.ndim)))(
        x, deterministic=False)


def param_count(params) -> int:
  """Number of scalars in a tree of arrays (boxed or not, real or `jax.ShapeDtypeStruct`)."""
  return sum(_size(x.shape) for x in jax.tree.leaves(params))


def _size(shape) -> int:
  n = 1
  for d in shape:
    n *= int(d)
  return n
