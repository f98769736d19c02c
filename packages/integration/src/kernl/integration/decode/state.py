"""The decode loop's state: every tensor a captured chunk of steps reads or writes, at fixed addresses.

A state is made for one cache and the model arguments of its steps (shapes fixed), and reused by every
later ``generate()`` call over that cache: :meth:`DecodeState.start` copies a call's values in, so a
capture made in an earlier call replays on the new call's tokens.
"""

import torch

from kernl.integration import hf_compat
from kernl.integration.decode.beam_search import BeamSearch, BeamSettings
from kernl.integration.decode.processors import Tokens
from kernl.integration.trees import map_tensors, tensors_in


class DecodeState:
    """Buffers of one decode (``batch`` rows, ``width`` token columns, ``vocab`` scores).

    ``tokens``: the sequences so far (:class:`~kernl.integration.decode.processors.Tokens`);
    ``token``: int64 ``(batch, 1)``, the last token of each row, the next step's input;
    ``unfinished``: int64 ``(batch,)``, 1 while a row has not ended (transformers' ``unfinished_sequences``);
    ``out_length``: int64 ``(1,)``, the sequence length transformers' loop stops at: one more for each
    step taken while a row was unfinished; ``noise``: fp32 ``(slots, batch, vocab)``, the draws of the
    next sampled steps (made on first use); ``model_kwargs``: the steps' model arguments, their tensors
    copies owned by the state; ``cache``: the static cache among them; ``searches``: the beam searches
    run over the state, by settings and prompt length.
    """

    def __init__(self, model_kwargs: dict, batch: int, width: int, device: torch.device):
        def new(*shape):
            return torch.zeros(shape, dtype=torch.int64, device=device)

        self.tokens = Tokens(ids=new(batch, width), length=new(1), max_length=new(1), starts=new(batch))
        self.token, self.unfinished, self.out_length = new(batch, 1), new(batch), new(1)
        self.noise: torch.Tensor | None = None
        self.model_kwargs = map_tensors(torch.clone, model_kwargs)
        self.cache = hf_compat.cache_argument(self.model_kwargs)[1]
        self.searches: dict[tuple[BeamSettings, int], BeamSearch] = {}
        self.graphs = None  # the captures of this state's chunks (kernl.integration.decode.loop)

    def start(
        self, input_ids: torch.Tensor, max_length: int, model_kwargs: dict, starts: torch.Tensor | None
    ) -> None:
        """Begin a call: its prompt ``input_ids`` (int64 ``(batch, length)``), ``max_length``, step model
        arguments (the shapes the state was made for) and the rows' first counted columns ``starts``
        (int64 ``(batch,)``, :attr:`Tokens.starts`; None: zeros)."""
        length = input_ids.shape[1]
        self.tokens.ids.zero_()
        self.tokens.ids[:, :length] = input_ids
        self.tokens.length.fill_(length)
        self.tokens.max_length.fill_(max_length)
        if starts is None:
            self.tokens.starts.zero_()
        else:
            self.tokens.starts.copy_(starts)
        self.token.copy_(input_ids[:, -1:])
        self.unfinished.fill_(1)
        self.out_length.fill_(length)
        torch._foreach_copy_(tensors_in(self.model_kwargs), tensors_in(model_kwargs))

    def search(self, settings: BeamSettings, prompt_length: int) -> BeamSearch:
        """The beam search of ``settings`` over this state's rows, reset for a new call (made on first use)."""
        key = (settings, prompt_length)
        search = self.searches.get(key)
        if search is None:
            batch = self.token.shape[0] // settings.num_beams
            search = BeamSearch(
                settings, batch_size=batch, prompt_length=prompt_length, device=self.token.device
            )
            self.searches[key] = search
        else:
            search.reset()
        return search

    def noise_slots(self, slots: int, vocab: int) -> torch.Tensor:
        """The noise buffer, made on first use."""
        if self.noise is None:
            batch = self.token.shape[0]
            self.noise = torch.empty((slots, batch, vocab), dtype=torch.float32, device=self.token.device)
        return self.noise
