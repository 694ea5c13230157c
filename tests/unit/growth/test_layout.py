import pytest

from growclip_stream.growth.layout import axes
from growclip_stream.model import GrowCLIP
from tests.helpers import operator_arch


@pytest.mark.parametrize("shared_depth", [0, 1])
def test_layout_describes_every_parameter_with_its_true_sizes(shared_depth: int) -> None:
    """Each axis the layout names has the size its role implies in a real model."""
    model = GrowCLIP(operator_arch(shared_depth))
    for name, t in model.state_dict().items():
        for ax in axes(name):
            tower = model.arch.tower(ax.tower)
            size = tower.mlp_hidden if ax.role == "hidden" else ax.parts * tower.width
            assert t.shape[ax.dim] == size, (name, ax)
    with pytest.raises(RuntimeError, match="no growth layout"):
        axes("image.blocks.0.attn.new_gate.weight")
    with pytest.raises(RuntimeError, match="no growth layout"):
        axes("text.extra_embed")
