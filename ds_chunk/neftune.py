"""NEFTune (``TrainingArguments.neftune_noise_alpha``) under a chunk-wise step, as the parent draws it.

transformers' hook adds uniform noise of size alpha / sqrt(L * H) to the embedding output,
L being the length of that embedding call. A chunk-wise step embeds one chunk at a time,
so the hook would scale by the chunk (sqrt(T / C) too large) and draw new noise in each
pass. Inside ``row_noise`` the hook's function is swapped for one that adds, to each chunk,
its slice of the noise of the whole row, drawn once before the first chunk with the same
call the parent's forward makes: the same noise, so the same loss and gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ds_chunk.adapter import base_model


@contextlib.contextmanager
def row_noise(model: nn.Module, input_ids: torch.Tensor, length: int | None = None) -> Iterator[None]:
    """NEFTune noise for ``input_ids`` [B, T] sized and drawn as one forward of the row would;
    ``length``: the row's own length where it was padded since (ZeRO-3's common length), the
    padding getting no noise."""
    from transformers.integrations.neftune import neftune_post_forward_hook

    hf = base_model(model)  # where transformers' activate_neftune finds the embedding, peft or not
    emb = hf.get_input_embeddings()
    alpha = getattr(emb, "neftune_noise_alpha", None)
    hooks = {k: h for k, h in emb._forward_hooks.items() if h is neftune_post_forward_hook}
    if alpha is None or not hooks or not emb.training:
        yield
        return
    batch, padded = input_ids.shape
    length = length or padded
    width = emb.embedding_dim if hasattr(emb, "embedding_dim") else emb.weight.shape[-1]
    dims = torch.tensor(length * width)
    # The parent's draw: zeros_like(embedding output [B, T, H]).uniform_(-mag, mag), before any
    # dropout mask of the step (the embedding runs first), so the RNG moves on as it would.
    noise = torch.zeros(batch, length, width, dtype=emb.weight.dtype, device=input_ids.device)
    noise.uniform_(-(alpha / torch.sqrt(dims)), alpha / torch.sqrt(dims))
    noise = torch.nn.functional.pad(noise, (0, 0, 0, padded - length))
    start = {"at": 0}

    def chunk_start(decoder, args, kwargs):
        positions = kwargs.get("position_ids")
        start["at"] = 0 if positions is None else int(positions.reshape(-1)[0])

    def chunk_noise(module, args, output):
        s = start["at"]
        return output + noise[:, s : s + output.shape[1]]

    pre = hf.get_decoder().register_forward_pre_hook(chunk_start, with_kwargs=True)
    for key in hooks:
        emb._forward_hooks[key] = chunk_noise
    try:
        yield
    finally:
        pre.remove()
        for key, hook in hooks.items():
            emb._forward_hooks[key] = hook
