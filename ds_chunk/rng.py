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
        self.cuda = device.type == "cuda"
        self.states: dict[int, tuple] = {}

    def snapshot(self) -> tuple:
        return torch.get_rng_state(), torch.cuda.get_rng_state() if self.cuda else None

    def restore(self, state: tuple) -> None:
        cpu, cuda = state
        torch.set_rng_state(cpu)
        if self.cuda:
            torch.cuda.set_rng_state(cuda)

    def record(self, chunk: int) -> None:
        self.states[chunk] = self.snapshot()

    def replay(self, chunk: int) -> None:
        self.restore(self.states[chunk])
