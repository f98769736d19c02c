"""bucketed_forward's record of the calls it compiled (``forward.has_graph``) with arguments that are
containers of plain values, which the capture key describes item by item."""

import torch

from kernl.integration.bucketed_forward import bucketed_forward


class _Toy(torch.nn.Module):
    def forward(self, input_ids, attention_mask=None, layers=None):
        scale = 1 + sum(layers or ())
        return input_ids.float() * scale


def test_a_list_argument_runs_and_is_remembered():
    model = _Toy().eval()
    forward = bucketed_forward(model, model.forward, model.forward, buckets=[8, 16], pad_id=0)
    ids = torch.randint(1, 50, (1, 5))
    out = forward(input_ids=ids, layers=[1, 2])
    torch.testing.assert_close(out, ids.float() * 4)
    assert forward.has_graph({"input_ids": ids, "layers": [1, 2]})
    assert not forward.has_graph({"input_ids": ids, "layers": [1, 3]})


def test_an_argument_no_key_describes_runs_and_is_not_remembered():
    """An arbitrary object (which the capture key cannot describe, so the call runs uncaptured) neither
    raises in the record nor makes ``has_graph`` claim a graph."""
    model = _Toy().eval()
    forward = bucketed_forward(model, model.forward, model.forward, buckets=[8, 16], pad_id=0)
    ids = torch.randint(1, 50, (1, 5))
    layers = range(2)  # neither a tensor, a plain value nor a list, tuple or dict
    out = forward(input_ids=ids, layers=layers)
    torch.testing.assert_close(out, ids.float() * 2)
    assert not forward.has_graph({"input_ids": ids, "layers": layers})
