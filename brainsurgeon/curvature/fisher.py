"""Curvature from per-sample gradients: the damped empirical Fisher H = G^T G + lam I as an operator.

G is n x p (one row per calibration sample, scaled by 1/sqrt(n)); the p x p matrix is never formed.
It is stored transposed (p x n, contiguous) so that one weight's gradient column g_i is a contiguous row,
which is what the combinatorial searches read most.
"""

import torch
from torch.func import functional_call, grad, vmap

from .. import distributed
from ..distributed import World
from ..errors import BrainSurgeonError
from ..modes import evaluating
from ..progress import progress_bar
from .gradient_store import FLOAT_BYTES, TRANSPOSE_BUFFER_BYTES, InMemoryGradients
from .quadratic import OVERFLOW, FactoredQuadratic

GIB = 1024**3


# Samples per vmap chunk at most: a conv net's per-sample activations under vmap, not its gradients, set the
# peak, and smaller chunks are no slower (docs/decisions.md).
MAX_CHUNK_SIZE = 64
BYTES_PER_WEIGHT_OF_WORK = 96  # the O(p) vectors of the methods: weights, swap terms, orders, masks


def memory_need(num_samples: int, regions, streamed: bool, chunk_size: int = MAX_CHUNK_SIZE) -> int:
    """Estimated peak bytes of the Fisher methods.

    In memory: G twice (storage and one working copy) plus each block's cached n x n Gram and Cholesky
    factor (float64). Streamed: the gradient chunks and transposition buffer, one block's rows twice and
    its two n x n matrices. Both add the O(p) working vectors.
    """
    n = num_samples
    sizes = [region.stop - region.start for region in regions]
    p = sum(sizes)
    work = BYTES_PER_WEIGHT_OF_WORK * p
    if not streamed:
        return 2 * n * p * FLOAT_BYTES + len(regions) * 2 * n * n * 8 + work
    chunks = 2 * min(chunk_size, n) * p * FLOAT_BYTES
    transpose = 2 * min(TRANSPOSE_BUFFER_BYTES, n * p * FLOAT_BYTES)
    return chunks + transpose + 2 * max(sizes) * n * FLOAT_BYTES + 2 * n * n * 8 + work


def choose_gradient_store(mode: str, num_samples: int, regions, max_memory: float,
                          chunk_size: int = MAX_CHUNK_SIZE) -> bool:
    """Whether to stream G from disk: 'memory', 'disk', or 'auto' (disk only when memory would not fit)."""
    if mode not in ("auto", "memory", "disk"):
        raise BrainSurgeonError(f"unknown gradients='{mode}'; use 'auto', 'memory' or 'disk'")
    in_memory = memory_need(num_samples, regions, False, chunk_size)
    streamed = memory_need(num_samples, regions, True, chunk_size)
    if mode == "memory" or (mode == "auto" and in_memory <= max_memory):
        need, stream = in_memory, False
    else:
        need, stream = streamed, True
    if need > max_memory:
        raise BrainSurgeonError(
            f"needs about {need / GIB:.1f} GiB ({'streamed' if stream else 'in memory'}) for {num_samples} "
            f"gradients of {sum(r.stop - r.start for r in regions)} weights in {len(regions)} Fisher block(s), above "
            f"max_memory={max_memory / GIB:.1f} GiB; use fewer calibration samples, smaller blocks "
            "(structure='layer' or 'block:K', which can stream from disk), or raise max_memory"
        )
    return stream


def per_sample_gradient_chunks(model, layers, inputs, targets, loss_fn, chunk_size=MAX_CHUNK_SIZE,
                               show_progress=True):
    """Yield (start, stop, rows of G): per-sample gradients of the loss w.r.t. the prunable weights only,
    for samples [start, stop), over sqrt(n), float32, with the model in eval mode.

    Under torch.distributed every rank computes the chunks of its contiguous share of the samples, and each chunk
    is broadcast by the rank that computed it: every rank yields every chunk, as one process would, and the
    selection then runs on each rank alike (sharding the selection itself is out of scope)."""
    n = len(inputs)
    params = dict(model.named_parameters())
    prunable = {layer.param: params[layer.param].detach() for layer in layers}
    frozen = {k: v.detach() for k, v in params.items() if k not in prunable}
    frozen.update(dict(model.named_buffers()))
    num_weights = sum(layer.size for layer in layers)

    def sample_loss(weights, x, y):
        out = functional_call(model, {**frozen, **weights}, (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    per_sample_grad = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    world = distributed.world()
    starts = list(range(0, n, chunk_size))
    mine = set(world.shard(starts))
    owners = {start: rank for rank in range(world.size) for start in World(rank, world.size).shard(starts)}
    with evaluating(model):
        for start in progress_bar(starts, "per-sample gradients", show_progress):
            stop = min(start + chunk_size, n)
            if start not in mine:
                yield start, stop, distributed.broadcast_tensor(torch.empty(stop - start, num_weights), owners[start])
                continue
            grads = per_sample_grad(prunable, inputs[start:stop], targets[start:stop])
            chunk = torch.cat([layer.gather(grads[layer.param]) for layer in layers], dim=1)
            scaled = (chunk / n**0.5).float()
            flat = scaled.reshape(-1)
            # The sum of squares bounds every entry of G G^T (Cauchy-Schwarz), and NaN and Inf propagate into it:
            # one pass, far cheaper than an elementwise check.
            if not torch.isfinite(flat @ flat):
                if not torch.isfinite(chunk.sum()):
                    raise BrainSurgeonError("per-sample gradients contain NaN or Inf; check the model, data and "
                                            "loss_fn")
                raise BrainSurgeonError(OVERFLOW)
            yield start, stop, distributed.broadcast_tensor(scaled.contiguous(), world.rank)


def per_sample_gradients(model, layers, inputs, targets, loss_fn, chunk_size=MAX_CHUNK_SIZE, show_progress=True):
    """G^T in memory (p x n, float32): column s is the gradient of sample s's loss over sqrt(n)."""
    chunks = per_sample_gradient_chunks(model, layers, inputs, targets, loss_fn, chunk_size, show_progress)
    num_weights = sum(layer.size for layer in layers)
    return InMemoryGradients.from_chunks(chunks, num_weights, len(inputs)).gradients_t


class EmpiricalFisher(FactoredQuadratic):
    """The damped empirical Fisher H = blockdiag(G_b^T G_b) + damping * I from the per-sample gradients (G^T in
    memory, as a tensor or InMemoryGradients, or a DiskGradients streamed one block at a time). Cross-block
    curvature is dropped, as in the paper's ResNet20 runs. With `first_order`, the mean gradient's linear term is
    modelled too (the model need not be at a minimum, e.g. after an earlier stage)."""

    def __init__(self, gradients, damping: float, regions=None, first_order: bool = False):
        store = InMemoryGradients(gradients) if isinstance(gradients, torch.Tensor) else gradients
        super().__init__(store, damping, regions, shift=store.shape[1] ** -0.5 if first_order else 0.0)
