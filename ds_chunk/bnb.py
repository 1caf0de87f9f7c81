"""bitsandbytes on CPUs with AVX512-BF16: keep 4-bit layers out of their inference-only layout.

bitsandbytes (0.50) repacks a ``Linear4bit`` weight in place when the layer is in eval
mode and gets an input without grad, as SeCO's no-grad pass and any evaluation do; every
later call then takes an inference kernel whose gradients are wrong.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def no_cpu_inference_packing(model: nn.Module) -> Iterator[None]:
    """Keep bitsandbytes 4-bit layers out of their CPU inference-only weight layout.

    bitsandbytes (0.50, CPUs with AVX512-BF16) repacks a ``Linear4bit`` weight in place
    when the layer is in eval mode and gets an input without grad, as the no-grad pass
    does; every later call then takes an inference kernel whose gradients are wrong.
    We switch that repacking off while we run, and undo any packing already done.
    """
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:  # not imported, so no quantized layer can exist
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    saved = [getattr(m, "support_avx512bf16_for_cpu", False) for m in layers]
    for m in layers:
        unpack_cpu_inference_layout(m)
        m.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for m, flag in zip(layers, saved):
            m.support_avx512bf16_for_cpu = flag


def unpack_cpu_inference_layout(layer: nn.Module) -> bool:
    """Return a repacked ``Linear4bit`` to the standard layout; True if it was packed.

    The packing rounded the block scales (absmax) to bfloat16, which no inverse can
    undo: the layer keeps those rounded scales, so we warn. bitsandbytes' own inverse
    also leaves non-nested scales transposed; we put them back in order.
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    state = getattr(layer.weight, "quant_state", None)
    if state is None or not getattr(state, "packing_format_for_cpu", False):
        return False
    nested = state.original_nested
    layer.weight.data, state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, state)
    if not nested:  # [K/blocksize, N] bf16 -> [N * K/blocksize] float32, the original order
        state.absmax = state.absmax.T.reshape(-1).float()
    layer.weight.quant_state = state
    warnings.warn(
        "bitsandbytes had repacked a 4-bit weight for CPU inference (an eval-mode no-grad pass); "
        "ds_chunk restored the training layout, but its block scales stay rounded to bfloat16",
        stacklevel=3,
    )
    return True
