"""Ours: per-block sparsities from a short evolutionary search judged on held-out calibration windows (issue 24).

EvoPress (Sieberling et al., ICML 2025) found that the summed per-layer errors do not predict a pruned model's
quality, while a search judged on the model's own output does. Here each candidate gives every block a sparsity:
the target plus a whole number of `step`s, at most `max_offset` steps away. A mutation moves one step from one
block to another, so blocks of equal size keep the global count (the final counts are made exact as for OWL,
drivers/owl.py). A candidate is judged by the KL divergence of the pruned model's next-output distribution (the
softmax over the output's last dimension) from the dense model's, on the last `windows` calibration inputs. Every
layer of a candidate is pruned by Wanda's rule, |W_ij| ||X_j|| lowest within each row, at its block's sparsity: a
stand-in for the real pruner that needs no Hessian, so a candidate costs one forward pass of those windows (only the
blocks whose sparsity changed are re-masked). The search is (1 + `offspring`) selection from the uniform
allocation: each generation mutates the best candidate `offspring` times, with one to three moves each, and keeps
the best of all, for `generations`.
"""
import time
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .. import validation
from ..modes import evaluating
from ..progress import progress_bar
from .activations import first_output, model_calls
from .owl import exact_counts, input_norms


@dataclass(frozen=True)
class AllocationSearch:
    """The search's settings (module docstring)."""

    generations: int = 24
    offspring: int = 8
    step: float = 0.02
    max_offset: int = 5
    windows: int = 2
    seed: int = 0

    def __post_init__(self):
        validation.count("generations", self.generations)
        validation.count("offspring", self.offspring)
        validation.number("step", self.step, low=0, high=0.5, low_open=True)
        validation.count("max_offset", self.max_offset)
        validation.count("windows", self.windows)
        validation.seed(self.seed)


def searched_allocation(model, calibration, sparsity: float, per_block, blocks, batch_size: int = 8,
                        search: AllocationSearch = AllocationSearch(), progress: bool = False) -> tuple:
    """({layer full name: sparsity} with the global count exact, the search's figures). `per_block`: the pruned
    layers of each block as (module name, full name, ...) (sequential.plan_layerwise)."""
    started = time.perf_counter()
    sparsity = validation.sparsity(sparsity)
    levels = [sparsity + offset * search.step for offset in range(-search.max_offset, search.max_offset + 1)]
    allowed = [0 <= level < 1 for level in levels]
    norms = input_norms(model, calibration, per_block, blocks, batch_size)
    judged = model_calls(model, calibration, search.windows)[-1]
    masks = _MaskedModel(blocks, norms, levels)
    generator = torch.Generator().manual_seed(search.seed)
    centre = search.max_offset
    try:
        with torch.no_grad(), evaluating(model):
            dense = F.log_softmax(_logits(model, judged).float(), dim=-1)

            def divergence(candidate):
                masks.apply(candidate)
                pruned = F.log_softmax(_logits(model, judged).float(), dim=-1)
                return float(F.kl_div(pruned, dense, log_target=True, reduction="sum")) / dense[..., 0].numel()

            best = [centre] * len(blocks)
            best_score = uniform_score = divergence(best)
            evaluations = 1
            for _ in progress_bar(range(search.generations), "allocation search", progress):
                children = [_mutated(best, allowed, generator) for _ in range(search.offspring)]
                for child in children:
                    score = divergence(child)
                    evaluations += 1
                    if score < best_score:
                        best, best_score = child, score
    finally:
        masks.restore()
    block_sparsity = [levels[index] for index in best]
    modules = dict(model.named_modules())
    sizes = {full: modules[full].weight.numel() for layers in per_block for _, full, *_ in layers}
    wanted = {full: value for value, layers in zip(block_sparsity, per_block) for _, full, *_ in layers}
    figures = dict(uniform_divergence=uniform_score, found_divergence=best_score, evaluations=evaluations,
                   block_sparsities=block_sparsity, seconds=time.perf_counter() - started)
    return exact_counts(wanted, sizes, sparsity), figures


def _logits(model, call) -> torch.Tensor:
    args, kwargs = call
    out = model(*args, **kwargs)
    return out.logits if hasattr(out, "logits") else first_output(out)


def _mutated(parent: list, allowed: list, generator: torch.Generator) -> list:
    """`parent` with one to three moves of one step of sparsity from one block to another, each within range."""
    child = list(parent)
    for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
        up = [b for b, level in enumerate(child) if level + 1 < len(allowed) and allowed[level + 1]]
        down = [b for b, level in enumerate(child) if level > 0 and allowed[level - 1]]
        if not up or not down:
            break
        raise_at = up[int(torch.randint(len(up), (1,), generator=generator))]
        lower = [b for b in down if b != raise_at]
        if not lower:
            break
        child[raise_at] += 1
        child[lower[int(torch.randint(len(lower), (1,), generator=generator))]] -= 1
    return child


class _MaskedModel:
    """The pruned layers' weights masked by Wanda's rule at each block's level, the dense weights kept to restore;
    a block is re-masked only when its level changes."""

    def __init__(self, blocks, norms, levels):
        self.layers = []  # per block: [(module, dense weight, norms, per-level row thresholds)]
        for (_, block), block_norms in zip(blocks, norms):
            entries = []
            for name, norm in block_norms.items():
                module = block.get_submodule(name)
                dense = module.weight.detach().clone()
                scores = dense.flatten(1).abs() * norm.to(dense.dtype)
                ordered = scores.sort(dim=1).values
                cols = ordered.shape[1]
                thresholds = [ordered[:, min(cols, round(level * cols)) - 1] if round(level * cols) > 0 else None
                              for level in (max(level, 0.0) for level in levels)]
                entries.append((module, dense, norm.to(dense.dtype), thresholds))
            self.layers.append(entries)
        self.current = [None] * len(self.layers)

    def apply(self, candidate: list) -> None:
        for index, (level, entries) in enumerate(zip(candidate, self.layers)):
            if level == self.current[index]:
                continue
            for module, dense, norm, thresholds in entries:
                threshold = thresholds[level]
                if threshold is None:
                    module.weight.copy_(dense)
                    continue
                keep = (dense.flatten(1).abs() * norm) > threshold.unsqueeze(1)
                module.weight.copy_(dense * keep.view_as(dense))
            self.current[index] = level

    def restore(self) -> None:
        with torch.no_grad():
            for entries in self.layers:
                for module, dense, _, _ in entries:
                    module.weight.copy_(dense)
