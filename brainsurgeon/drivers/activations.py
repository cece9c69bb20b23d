"""Activations of the layer-wise driver: the blocks, the calibration as the model's calls, the first block's
captured inputs, each layer's X X^T accumulated by hooks (and X_p X_d^T for the dense target), and a block run on
captured inputs."""
import inspect

import torch
from torch import nn
from torch.nn import functional as F

from ..distributed import sum_all_across_ranks
from ..errors import BrainSurgeonError, first_line
from ..modes import evaluating
from .calibration import ARRAYS, LIST_HINT, as_tensor, is_tensor_pair


class StopForward(Exception):
    """Raised by the capture hook: nothing after the first block needs to run."""


def find_blocks(model: nn.Module, blocks=None) -> list:
    """[(name, module)] of the blocks to prune in order: those named in `blocks`, else the children of the
    nn.ModuleList holding the most parameters, else the whole model as one block."""
    modules = dict(model.named_modules())
    if blocks is not None:
        missing = [name for name in blocks if name not in modules]
        if missing:
            raise BrainSurgeonError(f"blocks {missing} are not modules of {type(model).__name__}")
        return [(name, modules[name]) for name in blocks]
    lists = [(name, module) for name, module in modules.items() if isinstance(module, nn.ModuleList) and len(module)]
    if not lists:
        return [("", model)]
    name, chosen = max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))
    return [(f"{name}.{index}", block) for index, block in enumerate(chosen)]


GENERIC_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def repeated_blocks(model: nn.Module, layers: list) -> list:
    """[(name, module)] of the model's repeated blocks that hold all the `layers` (module names), in the model's
    order: the instances of the most common module class (generic containers aside) that hold a layer without
    being one, such as a ResNet's residual blocks. Empty when no such class holds every layer, or when it has a
    single instance. The caller must check that each block's output is the next one's input (check_chained)."""
    holders = {}
    for name, module in model.named_modules():
        if not name or name in layers or isinstance(module, GENERIC_CONTAINERS):
            continue
        held = [layer for layer in layers if layer.startswith(name + ".")]
        if held:
            holders.setdefault(type(module), []).append((name, module, held))
    if not holders:
        return []
    chosen = max(holders.values(), key=len)
    covered = sorted(layer for _, _, held in chosen for layer in held)
    if len(chosen) < 2 or covered != sorted(layers):
        return []
    return [(name, module) for name, module, _ in chosen]


def check_chained(model: nn.Module, blocks: list, call) -> bool:
    """Whether, on one call of the dense model, every block after the first is fed exactly the output of the one
    before it (and runs once): the layer-wise driver's propagation assumes it."""
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen.setdefault(name, []).append((args[0] if args else None, first_output(output)))
        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in blocks]
    try:
        with torch.no_grad(), evaluating(model):  # BatchNorm statistics stay as they are
            model(*call[0], **call[1])
    finally:
        for handle in handles:
            handle.remove()
    if any(len(seen.get(name, [])) != 1 for name, _ in blocks):
        return False
    return all(_same_tensor(seen[after][0][0], seen[before][0][1])
               for (before, _), (after, _) in zip(blocks, blocks[1:]))


def _same_tensor(fed, given) -> bool:
    if not (isinstance(fed, torch.Tensor) and isinstance(given, torch.Tensor)):
        return False
    return fed is given or (fed.shape == given.shape and torch.equal(fed, given))


def model_calls(model: nn.Module, calibration, batch_size: int) -> list:
    """Calibration as the model's (args, kwargs) calls: a tensor of inputs (token ids, images) split into batches,
    an (inputs, targets) pair, or an iterable of tensors, (inputs, ...) tuples or keyword dicts."""
    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    if is_tensor_pair(calibration):
        calibration = calibration[0]
    if isinstance(calibration, ARRAYS):
        calibration = list(as_tensor(calibration, "calibration inputs").split(batch_size))
    calls = []
    for item in calibration:
        if isinstance(item, dict):
            calls.append(((), {**extra, **item}))
        elif isinstance(item, ARRAYS):
            calls.append(((as_tensor(item, "calibration inputs"),), extra))
        elif isinstance(item, (tuple, list)) and item and isinstance(item[0], ARRAYS):
            calls.append(((as_tensor(item[0], "calibration inputs"),), extra))
        else:
            raise BrainSurgeonError(f"calibration items must be tensors, (inputs, ...) tuples or keyword dicts, "
                                    f"got {type(item).__name__}; {LIST_HINT}")
    if not calls:
        raise BrainSurgeonError("calibration data is empty; pass model inputs (e.g. token ids, num_seqs x seq_len)")
    for args, kwargs in calls:
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                raise BrainSurgeonError("calibration inputs contain NaN or Inf; clean or re-normalise the data")
    return calls


def capture_block_inputs(model: nn.Module, block: nn.Module, calls) -> list:
    """The (args, kwargs) each call hands `block`, with the model stopped there."""
    captured = []


    def stop(module, args, kwargs):
        captured.append((args, kwargs))
        raise StopForward


    handle = block.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for args, kwargs in calls:
            try:
                model(*args, **kwargs)
            except StopForward:
                continue
            except Exception as error:
                raise BrainSurgeonError(f"the model cannot run on the calibration data: {first_line(error)}; pass "
                                        "inputs shaped and typed as the model expects") from None
    finally:
        handle.remove()
    if len(captured) != len(calls):
        raise BrainSurgeonError("the first block never ran on the calibration data; name the blocks with blocks=[...]")
    return captured


def layer_inputs(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The rows x d_in matrix of what a layer multiplies its weight matrix with (a conv: its unfolded patches)."""
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(inputs, module.kernel_size, module.dilation, module.padding, module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return inputs.reshape(-1, inputs.shape[-1])


class HessianRecorder:
    """Forward hooks that add X X^T of every listed layer's inputs (float64 sums of float32 products), and the sum
    of its rows. Layers fed the same tensor (a transformer's q, k and v projections) share one product."""


    def __init__(self, modules: dict):
        self.sums = {name: None for name in modules}
        self.row_sums = {name: None for name in modules}
        self.counts = dict.fromkeys(modules, 0)
        self.sources = {name: [] for name in modules}  # the serial number of each product a layer added
        self.made = 0
        self.last = (None, None, None, None)  # (input tensor, layer kind, its product, the product's serial)
        self.handles = [module.register_forward_hook(self._hook(name)) for name, module in modules.items()]


    def _product(self, module, inputs):
        seen, kind, product, serial = self.last
        if seen is not inputs or kind != _layout(module):
            rows = layer_inputs(module, inputs.detach()).float()
            product = ((rows.T @ rows).double(), len(rows), rows.sum(0, dtype=torch.float64))
            self.made += 1
            serial = self.made
            self.last = (inputs, _layout(module), product, serial)
        return product, serial


    def _hook(self, name):
        def record(module, args, output):
            (product, rows, row_sum), serial = self._product(module, args[0])
            self.sums[name] = product.clone() if self.sums[name] is None else self.sums[name].add_(product)
            self.row_sums[name] = row_sum.clone() if self.row_sums[name] is None else self.row_sums[name] + row_sum
            self.counts[name] += rows
            self.sources[name].append(serial)
        return record


    def sum_across_ranks(self) -> None:
        """Under torch.distributed, add the other ranks' sums (each rank ran its own shard of the calls): every
        rank then holds the H of all the calls. Layers that added the very same products (fed one tensor) share
        one sum, and all of a block's sums travel in one collective."""
        for name in self.sums:
            if self.sums[name] is None:
                raise BrainSurgeonError(f"layer {name} never ran on the calibration data; leave it out with "
                                        "ignore=[...]")
        leaders = {}
        for name in self.sums:
            leaders.setdefault(tuple(self.sources[name]), name)
        parts = [[self.sums[name], self.row_sums[name],
                  torch.tensor(float(self.counts[name]), device=self.sums[name].device)] for name in leaders.values()]
        summed = iter(sum_all_across_ranks([part for group in parts for part in group]))
        totals = {leader: [next(summed) for _ in group] for leader, group in zip(leaders.values(), parts)}
        for name in self.sums:
            hessian, row_sum, count = totals[leaders[tuple(self.sources[name])]]
            self.sums[name], self.row_sums[name], self.counts[name] = hessian, row_sum, int(count)

    def hessian(self, name) -> torch.Tensor:
        hessian = self.sums[name] / self.counts[name]
        check_finite_hessian(hessian, name)
        return hessian

    def take_hessian(self, name) -> torch.Tensor:
        """hessian(name), the recorder letting go of the layer's sum: a block's widest H (cols^2 float64 values,
        as large as the block's weights) is then held once while its layer is solved, not twice."""
        hessian = self.hessian(name)
        del self.sums[name]
        return hessian


    def mean(self, name) -> torch.Tensor:
        """The mean of the layer's input rows."""
        return self.row_sums[name] / self.counts[name]


    def close(self):
        self.last = (None, None, None, None)
        for handle in self.handles:
            handle.remove()


def check_finite_hessian(hessian: torch.Tensor, name: str) -> None:
    if not torch.isfinite(hessian).all():
        raise BrainSurgeonError(f"the inputs of layer {name} overflow: X X^T is not finite (activations too large for "
                                "float32); rescale the calibration inputs or check the model's weights")


def _layout(module: nn.Module):
    """What decides how a layer unfolds its input: layers of one layout fed one tensor see the same X."""
    if isinstance(module, nn.Conv2d):
        return ("conv", module.kernel_size, module.dilation, module.padding, module.stride)
    return ("linear",)


def first_output(out) -> torch.Tensor:
    """A module's output hidden states: its first output when it returns a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


def run_block(block, inputs) -> list:
    """The block's output hidden states for each captured call."""
    return [first_output(block(*args, **kwargs)) for args, kwargs in inputs]


def run_block_until(block, layer: nn.Module, inputs) -> None:
    """Run each captured call of `block` only until `layer` has run (its forward hooks included): the
    statistics of one layer need nothing after it."""
    def stop(module, args, output):
        raise StopForward

    handle = layer.register_forward_hook(stop)  # registered last, so the layer's other hooks run first
    try:
        for args, kwargs in inputs:
            call_until_stopped(block, args, kwargs)
    finally:
        handle.remove()


def call_until_stopped(module: nn.Module, args, kwargs) -> None:
    """Call `module`; a hook that raises StopForward ends the call early, as meant."""
    try:
        module(*args, **kwargs)
    except StopForward:
        pass


def with_first(inputs, hidden) -> list:
    return [((h, *args[1:]), kwargs) for (args, kwargs), h in zip(inputs, hidden)]


def input_groups(block: nn.Module, names: list, call) -> dict:
    """{layer name: the first of `names` fed the very same input tensor} on one call of `block`: layers fed one
    tensor (a transformer's q, k and v projections; an MLP's gate and up) see the same X however the others of their
    group are pruned, since that tensor exists before any of them runs."""
    modules, fed = dict(block.named_modules()), {}

    def record(name):
        def hook(module, args):
            fed.setdefault(name, args[0])
        return hook

    handles = [modules[name].register_forward_pre_hook(record(name)) for name in names]
    try:
        with torch.no_grad():
            block(*call[0], **call[1])
    finally:
        for handle in handles:
            handle.remove()
    groups = {}
    for name in names:
        groups[name] = next((other for other in names[: names.index(name)]
                             if other in fed and name in fed and fed[other] is fed[name]), name)
    return groups


def cross_products(block, dense_block, name, inputs, dense_inputs) -> tuple:
    """(X_p X_p^T / N, X_p X_d^T / N) of layer `name`: X_p its inputs in `block` on the pruned stream, X_d in
    `dense_block` on the dense stream, row for row. Each forward pass stops once the layer has its input."""
    return cross_statistics(block, dense_block, name, inputs, dense_inputs)[:2]


def cross_statistics(block, dense_block, name, inputs, dense_inputs) -> tuple:
    """cross_products, and the means of X_p's and X_d's rows."""
    captured = {}


    def capture(key):
        def hook(module, args):
            captured[key] = layer_inputs(module, args[0].detach()).float()
            raise StopForward
        return hook


    handles = [dict(model.named_modules())[name].register_forward_pre_hook(capture(key))
               for key, model in (("pruned", block), ("dense", dense_block))]
    hessian = cross = None
    rows, sums = 0, [0.0, 0.0]
    try:
        for (args, kwargs), (dense_args, dense_kwargs) in zip(inputs, dense_inputs):
            for model, call_args, call_kwargs in ((dense_block, dense_args, dense_kwargs), (block, args, kwargs)):
                call_until_stopped(model, call_args, call_kwargs)
            pruned_rows, dense_rows = captured.pop("pruned"), captured.pop("dense")
            products = ((pruned_rows.T @ pruned_rows).double(), (pruned_rows.T @ dense_rows).double())
            hessian, cross = products if hessian is None else (hessian.add_(products[0]), cross.add_(products[1]))
            sums = [sums[0] + pruned_rows.double().sum(0), sums[1] + dense_rows.double().sum(0)]
            rows += len(pruned_rows)
    finally:
        for handle in handles:
            handle.remove()
    count = torch.tensor(float(rows), device=hessian.device)
    hessian, cross, *sums, rows = sum_all_across_ranks([hessian, cross, *sums, count])
    rows = int(rows)  # each rank ran its own shard of the calls
    hessian, cross = hessian / rows, cross / rows
    check_finite_hessian(hessian, name)
    check_finite_hessian(cross, name)
    return hessian, cross, sums[0] / rows, sums[1] / rows
