"""Run by `deepspeed --num_gpus 2`: rank 1 never joins rank 0's step. Rank 0's step must end in
an error once dist_timeout has passed, not hang."""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engine_ref import ds_config, lora_model  # noqa: E402

import ds_chunk  # noqa: E402

engine, *_ = ds_chunk.initialize(model=lora_model(), config=ds_config(2, False), dist_timeout=3)
if engine.rank_and_world()[0] == 1:
    time.sleep(20)  # away: rank 0 waits for it in a collective that does not come
    os._exit(0)
t0 = time.time()
try:
    engine.train_batch({"input_ids": torch.randint(0, 97, (2, 40))})
except Exception as e:  # gloo: "Timed out waiting ... for recv operation"
    print(f"rank 0: {type(e).__name__} after {time.time() - t0:.1f} s", flush=True)
    os._exit(3)
print("rank 0: the step finished without rank 1", flush=True)
