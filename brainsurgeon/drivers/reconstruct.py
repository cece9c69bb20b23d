"""Block reconstruction (issue 24): after a block's layers are pruned, its kept weights are fitted so that the block's
output on the pruned model's inputs matches the dense block's output on the dense model's inputs, with every mask
fixed.

A per-matrix refit (SparseGPT's, or the exact least-squares update) cannot see the nonlinearity between two layers
(attention's softmax, the MLP's gate); a fit of the whole block can. The fit is Adam on the mean squared output
error over the training pieces of the calls (about 32 pieces in all, so that an epoch is enough Adam steps whatever
the batch size), each pruned layer's step size a fraction of its weights' root mean square (so one constant serves
layers and models of any scale), judged on held-out pieces after every epoch: an epoch that does not
lower the held-out error goes back to the best weights and halves the step, and the fit stops after the third such
epoch in a row. The weights kept are those with the least held-out error seen, the unrefit ones included, so the
held-out block error never rises. A pruned weight
gets no gradient and stays exactly zero. Cost: forward and backward passes of one block; memory: one block, its
activations and Adam's two moments of the pruned layers' weights.

The window is the whole block ('block') or each of its sub-layers ('sublayer': every child module of the block
that holds pruned layers, such as a transformer's attention and MLP, in the order the block runs them). A
sub-layer is fitted to the dense sub-layer's output on the dense stream, from its inputs on the pruned stream as
the sub-layers refitted before it leave them.

Under torch.distributed each rank cuts its own share of the calls into pieces of the size one process would cut
them, so that the ranks' pieces, in rank order, are one process's pieces. Each Adam step is on one piece: the rank
holding it computes the gradient, which every rank receives (a sum over the ranks, the others adding zeros), and
the held-out error sums every rank's share of the held-out pieces. All ranks take one process's steps, and keep
the weights it keeps; the ranks share the held-out judgements, not the steps.
"""
import time
from dataclasses import dataclass

import torch
from torch import nn

from .. import validation
from ..distributed import gather_objects, sum_across_ranks, sum_all_across_ranks, world
from ..errors import BrainSurgeonError
from .activations import StopForward, call_until_stopped, first_output, run_block

WINDOWS = ("none", "sublayer", "block")
KEYWORDS = ("reconstruct", "reconstruct_epochs", "reconstruct_step")  # prune_layerwise's, and the flags' names
DEFAULT_EPOCHS = 4
DEFAULT_STEP = 1e-2  # Adam's step as a fraction of each layer's weight RMS: measured on SmolLM2 and ResNet20
MAX_STEP_HALVINGS = 2  # an epoch that does not lower the held-out error halves the step, from the best weights
PIECES = 32  # the calibration samples are cut into about this many pieces: 28 Adam steps an epoch, 4 held out


@dataclass(frozen=True)
class Reconstruction:
    """How each pruned block is refitted: `window` 'none' (the per-matrix refits alone), 'sublayer' (each child
    module holding pruned layers against the dense child's output) or 'block' (the whole block against the dense
    block's output); at most `epochs` passes over the training pieces of the calls (pieces()), Adam's step
    `step` times each layer's weight RMS; the last `held_out` fraction of the pieces (at least one) judges
    early stopping; `seed` orders the training pieces."""

    window: str = "none"
    epochs: int = DEFAULT_EPOCHS
    step: float = DEFAULT_STEP
    held_out: float = 0.125
    seed: int = 0

    def __post_init__(self):
        validation.choice("reconstruct", self.window, WINDOWS)
        validation.count("reconstruct_epochs", self.epochs)
        validation.positive("reconstruct_step", self.step)
        validation.number("reconstruct_held_out", self.held_out, low=0, high=1, low_open=True, high_open=True)
        validation.count("seed", self.seed, minimum=0)

    @property
    def active(self) -> bool:
        return self.window != "none"

    def settings(self) -> dict:
        return dict(reconstruct=self.window, **(dict(reconstruct_epochs=self.epochs, reconstruct_step=self.step,
                                                     reconstruct_held_out=self.held_out) if self.active else {}))


def plan_reconstruction(reconstruct: str = "none", reconstruct_epochs: int = None,
                        reconstruct_step: float = None) -> Reconstruction:
    """The Reconstruction prune_layerwise's keywords ask for (None: the default); epochs or step without a window
    to fit is refused rather than ignored."""
    given = [name for name, value in (("reconstruct_epochs", reconstruct_epochs),
                                      ("reconstruct_step", reconstruct_step)) if value is not None]
    if given and reconstruct in (None, "none"):
        raise BrainSurgeonError(f"{' and '.join(given)} apply to a block reconstruction; pass reconstruct='block' "
                                f"(or 'sublayer') or drop {' and '.join(given)}")
    return Reconstruction(reconstruct or "none", DEFAULT_EPOCHS if reconstruct_epochs is None else reconstruct_epochs,
                          DEFAULT_STEP if reconstruct_step is None else reconstruct_step)


def block_output(block: nn.Module, args, kwargs) -> torch.Tensor:
    return first_output(block(*args, **kwargs))


def fitted_children(block: nn.Module, pruned: list) -> list:
    """The names of `block`'s direct children that hold any of the `pruned` module names, in registration order."""
    return [name for name, _ in block.named_children() if any(p == name or p.startswith(name + ".") for p in pruned)]


def dense_targets(block: nn.Module, dense_inputs: list, plan: Reconstruction, pruned: list) -> tuple:
    """Run the still-dense `block` on the dense stream: (its outputs, what the plan's window fits them to). The
    latter is the outputs themselves for 'block', and for 'sublayer' [(child name, its outputs per call)] in the
    order the block runs the children."""
    if plan.window != "sublayer":
        with torch.no_grad():
            outputs = run_block(block, dense_inputs)
        return outputs, outputs
    children = fitted_children(block, pruned)
    captured, order = {name: [] for name in children}, []

    def keep(name):
        def hook(module, args, output):
            captured[name].append(first_output(output).detach())
            if name not in order:
                order.append(name)
        return hook

    handles = [block.get_submodule(name).register_forward_hook(keep(name)) for name in children]
    try:
        with torch.no_grad():
            outputs = run_block(block, dense_inputs)
    finally:
        for handle in handles:
            handle.remove()
    if any(len(captured[name]) != len(dense_inputs) for name in children):
        raise BrainSurgeonError("reconstruct='sublayer' needs each sub-layer to run once per block call; use "
                                "reconstruct='block'")
    return outputs, [(name, captured[name]) for name in order]


def reconstruct(block: nn.Module, masks: dict, inputs: list, targets, plan: Reconstruction) -> dict:
    """Fit `block`'s pruned weights (`masks`: module name inside the block -> keep mask) in the plan's window, from
    the pruned stream's `inputs`, to `targets` (the second item of dense_targets). Returns the fit's figures: for
    'sublayer', the held-out errors and epochs per child, the seconds summed."""
    if plan.window == "block":
        return reconstruct_block(block, masks, inputs, targets, plan)
    figures = {}
    for name, child_targets in targets:
        child = block.get_submodule(name)
        child_inputs = _child_inputs(block, child, inputs)
        child_masks = {key[len(name) + 1:]: mask for key, mask in masks.items()  # the child itself is ''
                       if key == name or key.startswith(name + ".")}
        figures[name] = reconstruct_block(child, child_masks, child_inputs, child_targets, plan)
    return dict(sublayers=figures, seconds=sum(figure["seconds"] for figure in figures.values()))


def pieces(calls: list, targets: list, count: int = PIECES, samples: int | None = None) -> tuple:
    """The calls and their targets cut along the batch dimension into pieces of about equal size, about `count` in
    all for `samples` samples (default: the calls' own; whole samples; each call into a whole number of nearly
    equal pieces): each piece is one Adam step or one held-out judgement. The batch dimension is the first tensor
    argument's first one; every other tensor (in the arguments, keyword arguments and tuples of them) of at least
    two dimensions whose first dimension is the same is cut with it, and the rest (positions shared by the batch,
    flags) are handed to every piece."""
    sizes = [_batch_size(call) for call in calls]
    size = max(1, (sum(sizes) if samples is None else samples) / count)
    cut_calls, cut_targets = [], []
    for call, target, batch in zip(calls, targets, sizes):
        parts = max(1, min(batch, round(batch / size)))
        if parts == 1:
            cut_calls.append(call)
            cut_targets.append(target)
            continue
        for part in torch.arange(batch, device="cpu").tensor_split(parts):  # positions, read on the host
            piece = slice(int(part[0]), int(part[-1]) + 1)
            cut_calls.append(_cut(call, batch, piece))
            cut_targets.append(target[piece])
    return cut_calls, cut_targets


def _batch_size(call) -> int:
    """The first dimension of the call's first tensor of two dimensions or more (positional, else by keyword: a
    transformer's attention gets its hidden states as hidden_states=...), 1 without one."""
    args, kwargs = call
    first = next((value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)
                  and value.dim() >= 2), None)
    return 1 if first is None else first.shape[0]


def _cut(value, batch: int, piece: slice):
    if isinstance(value, torch.Tensor):
        return value[piece] if value.dim() >= 2 and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cut(item, batch, piece) for item in value)
    if isinstance(value, dict):
        return {key: _cut(item, batch, piece) for key, item in value.items()}
    return value


def _child_inputs(block, child, inputs) -> list:
    """The (args, kwargs) each block call hands `child`, the block stopped there."""
    captured = []

    def stop(module, args, kwargs):
        captured.append((tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), kwargs))
        raise StopForward

    handle = child.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with torch.no_grad():
            for args, kwargs in inputs:
                call_until_stopped(block, args, kwargs)
    finally:
        handle.remove()
    return captured


def _error(block, calls, targets) -> float:
    """The mean squared output error over the calls, of every rank's calls under torch.distributed (each rank
    passes its own)."""
    with torch.no_grad():
        total = sum(float((block_output(block, *call) - target).double().pow(2).sum())
                    for call, target in zip(calls, targets))
    device = next(block.parameters()).device  # a rank may hold no held-out call
    total, count = sum_across_ranks(torch.tensor([total, sum(target.numel() for target in targets)],
                                                 dtype=torch.float64, device=device)).tolist()
    return total / count


def reconstruct_block(block: nn.Module, masks: dict, inputs: list, targets: list, plan: Reconstruction) -> dict:
    """Fit the weights of `block`'s pruned layers (`masks`: module name inside the block -> bool keep mask) so
    that the block's output on `inputs` (captured calls: (args, kwargs)) matches `targets` (one tensor per call).
    The block's weights are changed in place. Returns the held-out errors before and after, the epochs run and
    the seconds."""
    if len(inputs) != len(targets):
        raise BrainSurgeonError(f"{len(inputs)} calls but {len(targets)} targets to reconstruct")
    # under torch.distributed each rank holds its share of the calls: cut as one process cuts them all, its
    # pieces are the global pieces [first, first + len(inputs)) in rank order
    samples = sum(gather_objects(sum(_batch_size(call) for call in inputs)))
    inputs, targets = pieces(inputs, targets, PIECES, samples)
    counts = gather_objects(len(inputs))
    first, total = sum(counts[: world().rank]), sum(counts)
    if total < 2:
        raise BrainSurgeonError("block reconstruction holds out calibration calls to stop early and needs at least 2; "
                                "give more calibration inputs or a smaller batch_size")
    started = time.perf_counter()
    held = min(max(1, round(plan.held_out * total)), total - 1)  # at least one piece each side
    held_from = max(0, total - held - first)  # this rank's first held-out piece (local index)
    check, check_targets = inputs[held_from:], targets[held_from:]
    modules = dict(block.named_modules())
    weights = {name: modules[name].weight for name in masks}
    keep = {name: mask.to(weights[name].device) for name, mask in masks.items()}
    groups = [dict(params=[w], lr=plan.step * float(w.detach().pow(2).mean().sqrt().clamp_min(1e-12)))
              for w in weights.values()]
    optimizer = torch.optim.Adam(groups)
    best = before = _error(block, check, check_targets)
    best_state = {name: w.detach().clone() for name, w in weights.items()}
    generator = torch.Generator().manual_seed(plan.seed)
    epochs = stalls = 0
    requires = {p: p.requires_grad for p in block.parameters()}
    try:
        for p in requires:
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        with torch.enable_grad():
            for epoch in range(plan.epochs):
                for piece in torch.randperm(total - held, generator=generator, device="cpu").tolist():
                    optimizer.zero_grad(set_to_none=True)
                    index = piece - first
                    if 0 <= index < len(inputs):  # this rank holds the piece
                        output = block_output(block, *inputs[index])
                        loss = (output - targets[index]).pow(2).mean()
                        loss.backward()
                    for name, w in weights.items():
                        if w.grad is None:
                            w.grad = torch.zeros_like(w)
                        w.grad.mul_(keep[name])
                    if world().active:  # every rank takes the step of the rank holding the piece
                        grads = [w.grad for w in weights.values()]
                        for grad, summed in zip(grads, sum_all_across_ranks(grads)):
                            grad.copy_(summed)
                    optimizer.step()
                    with torch.no_grad():
                        for name, w in weights.items():
                            w.mul_(keep[name])  # Adam gives a zero gradient a zero step; this guards rounding
                epochs = epoch + 1
                error = _error(block, check, check_targets)
                if error < best:
                    best, best_state, stalls = error, {name: w.detach().clone() for name, w in weights.items()}, 0
                    continue
                stalls += 1
                if stalls > MAX_STEP_HALVINGS:
                    break
                with torch.no_grad():  # back to the best weights seen, on at half the step
                    for name, w in weights.items():
                        w.copy_(best_state[name])
                for group in optimizer.param_groups:
                    group["lr"] /= 2
    finally:
        with torch.no_grad():
            for name, w in weights.items():
                w.copy_(best_state[name])
                w.grad = None
        for p, required in requires.items():
            p.requires_grad_(required)
    return dict(held_out_before=before, held_out_after=best, epochs=epochs, held_out_calls=held,
                seconds=time.perf_counter() - started)
