"""README's "With DeepSpeed" example, runnable as it stands (a test keeps the two equal).

deepspeed --num_gpus 1 launch/minimal_deepspeed.py    # or: python launch/minimal_deepspeed.py
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import ds_chunk

# Any HF causal LM; this one is tiny and random so the example runs offline on a CPU.
model = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=4096))  # fmt: skip
# A plain DeepSpeed config plus a top-level "chunkwise" block (chunk_size 256).
engine, optimizer, _, lr_scheduler = ds_chunk.initialize(model=model, config="ds_configs/minimal.json")

sequences = torch.randint(0, 1000, (16, 1024))  # your tokenized data: 16 sequences of 1024 tokens
rows = engine.train_micro_batch_size_per_gpu() * engine.gradient_accumulation_steps()
for step, input_ids in enumerate(torch.utils.data.DataLoader(sequences, batch_size=rows, shuffle=True)):
    loss = engine.train_batch({"input_ids": input_ids})  # 4 chunk backwards, then one engine.step()
    print(f"step {step}: loss {loss.item():.3f}")
engine.hf_model.save_pretrained("runs/minimal")  # a plain HF checkpoint (an adapter for peft models)
