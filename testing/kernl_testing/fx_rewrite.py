"""kernl's FX rewrite applied to the one graph TorchDynamo captures of a small function (integration tests)."""

import torch


def rewritten(fn, *inputs):
    """``(record, rewritten graph module, compiled fn)``: ``fn`` compiled (static shapes) with a backend that
    runs kernl's rules on the graph TorchDynamo captures when called with ``inputs``."""
    from kernl.integration.backend import rewrite_graph
    from kernl.integration.report import GraphRecord

    record, captured = GraphRecord(inputs="test"), []

    def backend(gm, example_inputs):
        captured.append(rewrite_graph(gm, record, example_inputs))
        return captured[0].forward

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend, dynamic=False)
    compiled(*inputs)
    return record, captured[0], compiled
