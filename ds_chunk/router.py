"""The MoE router's load-balancing loss, chunk by chunk and exact.

transformers adds ``coef * aux`` to an MoE model's loss when ``output_router_logits`` is on
(``load_balancing_loss_func``, the same in every family that has one):

    aux = E * sum_e f_e * P_e,   f_e = count_e / N,   P_e = sum_tokens softmax(logits)_e / N

over every router layer and every (unpadded) token of the batch: count_e is how often expert e
is in a token's top-k, N the number of (layer, token) rows. f carries no gradient, so once the
no-grad pass has counted every chunk's routing, a chunk's share of aux is linear in its own
router probabilities and its replay can add exactly that share to its loss. Like transformers,
counts and probability sums are float32.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
from torch import nn

from ds_chunk.adapter import UnsupportedModelError


class RouterLoss:
    """The load-balancing loss of one micro-batch, built up as its chunks run.

    ``record(c)`` collects the router logits of the chunk forward inside it; ``count`` adds
    a chunk's top-k routing to f (once per chunk, from its first forward); ``share`` is the
    chunk's part of ``weight * coef * aux`` with its gradient, valid once every chunk is
    counted; ``value`` is aux itself.
    """

    def __init__(self, routers: list[nn.Module], num_experts: int, top_k: int, coef: float, weight: float):
        self.routers, self.num_experts, self.top_k = routers, num_experts, top_k
        self.coef, self.weight = coef, weight
        self.counts: torch.Tensor | None = None  # [E] top-k assignments (float32, as transformers)
        self.probs: torch.Tensor | None = None  # [E] router probability sums, for ``value``
        self.rows = None  # (layer, token) rows counted: N
        self.counted: set[int] = set()
        self.logits: list[torch.Tensor] = []

    @classmethod
    def of(cls, hf: nn.Module, weight: float = 1.0) -> RouterLoss | None:
        """The model's load-balancing loss, or None where its forward adds none (off, a
        coefficient of 0, or a family without one, e.g. DeepSeek-V3, GLM-4-MoE)."""
        cfg = hf.config
        if not getattr(cfg, "output_router_logits", False):
            return None
        if getattr(sys.modules[type(hf).__module__], "load_balancing_loss_func", None) is None:
            return None  # DeepSeek-V3, GLM-4-MoE: routing balanced by a bias, no loss term
        recorder = (getattr(hf, "_can_record_outputs", None) or {}).get("router_logits")
        if (
            recorder is None
            or recorder.index != 0
            or not all(hasattr(hf, a) for a in ("router_aux_loss_coef", "num_experts", "num_experts_per_tok"))
        ):  # e.g. Doge (top-k of sqrt(E), logits at index 1), JetMoe (aux_loss_coef)
            raise UnsupportedModelError(
                f"{type(hf).__name__}: output_router_logits=True: its load-balancing loss is not laid out as "
                "Mixtral's (router logits first, num_experts_per_tok, router_aux_loss_coef), which ds_chunk chunks; "
                "set output_router_logits=False"
            )
        coef = getattr(cfg, "router_aux_loss_coef", 0.0)  # the config's, as TRL sets it (the model's at load)
        if not coef:
            return None
        suffix = recorder.layer_name or ""  # e.g. MiniMax's "mlp.gate": the class alone is not enough
        kind = recorder.target_class
        routers = [m for name, m in hf.named_modules() if isinstance(m, kind) and name.endswith(suffix)]
        return cls(routers, hf.num_experts, hf.num_experts_per_tok, float(coef), weight)

    @contextlib.contextmanager
    def record(self) -> Iterator[list[torch.Tensor]]:
        """The router logits ([B * C, E] per router layer) of the forward run inside the block."""
        self.logits = []
        hooks = [r.register_forward_hook(self._keep) for r in self.routers]
        try:
            yield self.logits
        finally:
            for h in hooks:
                h.remove()

    def _keep(self, module, args, output) -> None:
        self.logits.append(output[0] if isinstance(output, tuple) else output)

    def count(self, c: int, logits: list[torch.Tensor], mask: torch.Tensor | None) -> None:
        """Add chunk c's top-k routing, probabilities and rows (no gradient); mask: [B, C] or None."""
        if c in self.counted:
            return
        self.counted.add(c)
        with torch.no_grad():
            for layer in logits:
                weights = layer.softmax(dim=-1)  # in the logits' dtype, as transformers picks top-k
                chosen = torch.topk(weights, self.top_k, dim=-1).indices.reshape(-1)
                flat = self._flat(mask, layer)
                if self.counts is None:
                    self.counts, self.probs = (flat.new_zeros(self.num_experts) for _ in range(2))
                    self.rows = flat.new_zeros(())
                self.counts.scatter_add_(0, chosen, flat.repeat_interleave(self.top_k))
                self.probs += (weights.float() * flat[:, None]).sum(0)
                self.rows += flat.sum()

    def share(self, logits: list[torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
        """This chunk's part of ``weight * coef * aux``, with the gradient of its router logits."""
        probs = sum((layer.softmax(dim=-1).float() * self._flat(mask, layer)[:, None]).sum(0) for layer in logits)
        return self.weight * self.coef * self.num_experts * ((self.counts / self.rows) * (probs / self.rows)).sum()

    def value(self) -> float:
        """aux for the whole micro-batch (once every chunk is counted)."""
        return float(self.num_experts * ((self.counts / self.rows) * (self.probs / self.rows)).sum())

    @staticmethod
    def _flat(mask: torch.Tensor | None, layer: torch.Tensor) -> torch.Tensor:
        if mask is None:
            return layer.new_ones(layer.shape[0], dtype=torch.float32)
        return mask.reshape(-1).to(device=layer.device, dtype=torch.float32)
