"""Per-chunk RNG states, so a chunk's replay draws the dropout masks of its no-grad pass."""

from __future__ import annotations

import torch


class RngTape:
    """Replays each chunk with the RNG state it had in the no-grad pass.

    So dropout (LoRA dropout, attention dropout) draws the same masks in both passes:
    the replayed K/V equal the stored leaves, and the gradient is exact for the sampled
    masks, as with activation checkpointing. The state after the last chunk's replay has
    drawn its masks is what one forward pass leaves behind: the scheduler ends there, so
    the next step's masks are new ones.
    """

    def __init__(self, device: torch.device):
        # the input's device, not the current one: a model on cuda:1 without set_device(1)
        # draws its masks from cuda:1's generator
        self.cuda = device if device.type == "cuda" else None
        self.states: dict[int, tuple] = {}

    def snapshot(self) -> tuple:
        return torch.get_rng_state(), None if self.cuda is None else torch.cuda.get_rng_state(self.cuda)

    def restore(self, state: tuple) -> None:
        cpu, cuda = state
        torch.set_rng_state(cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(cuda, self.cuda)

    def record(self, chunk: int) -> None:
        self.states[chunk] = self.snapshot()

    def replay(self, chunk: int) -> None:
        self.restore(self.states[chunk])
