"""Our allocation (drivers/search_allocation.py): the global count exact, the model handed back, deterministic,
never judged worse than the uniform allocation, and the block that matters most spared."""
import pytest
import torch
from helpers import assert_same_result, tiny_llama

from brainsurgeon import BrainSurgeonError, prune_layerwise
from brainsurgeon.drivers.search_allocation import AllocationSearch


def sensitive_llama():
    """A tiny Llama whose second block writes eight times more into the residual stream than the others."""
    model = tiny_llama(layers=4)
    with torch.no_grad():
        block = model.model.layers[1]
        block.self_attn.o_proj.weight.mul_(8)
        block.mlp.down_proj.weight.mul_(8)
    return model


def test_the_search_spares_the_block_that_matters_and_keeps_the_global_count():
    model, ids = sensitive_llama(), torch.randint(0, 96, (16, 24), generator=torch.Generator().manual_seed(0))
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    result = prune_layerwise(model, ids, 0.6, "sparsegpt", allocation="search", progress=False)
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())
    pruned = sum(int((~mask).sum()) for mask in result.masks.values())
    assert pruned == round(0.6 * sum(mask.numel() for mask in result.masks.values()))
    figures = result.stats["allocation"]
    assert figures["found_divergence"] < figures["uniform_divergence"]
    chosen = figures["block_sparsities"]
    assert chosen.index(min(chosen)) == 1 and max(abs(value - 0.6) for value in chosen) <= 0.1 + 1e-9
    per_layer = result.settings["layer_sparsities"]
    assert result.settings["allocation"] == "search" and per_layer["model.layers.1.mlp.down_proj"] < 0.6
    assert_same_result(result, prune_layerwise(model, ids, 0.6, "sparsegpt", allocation="search", progress=False))


def test_the_search_refuses_what_it_cannot_run():
    model, ids = tiny_llama(layers=2), torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(BrainSurgeonError, match="allocation 'search' chooses"):
        prune_layerwise(model, ids, None, "sparsegpt", pattern="2:4", allocation="search", progress=False)
    for bad in (dict(step=0.0), dict(generations=0), dict(windows=-1)):
        with pytest.raises(BrainSurgeonError):
            AllocationSearch(**bad)
