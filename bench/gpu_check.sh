#!/usr/bin/env bash
# The first look at raylm on one GPU (written for an H100, under 8 minutes; not yet run on one): tokens/s, MFU and
# peak memory of rank 0's logging windows (training_log.jsonl, the first window of start-up and compile left out)
# for GPT-2 124M bf16 eager and compiled, BERT-base MLM bf16, GPT-2 124M fp16, FSDP2 on one GPU with and without
# CPU offload, and a 1B Llama-style model's peak memory under FSDP. Models are trained from scratch with a tokenizer
# trained on the sample corpus, so nothing is downloaded. A run that fails prints its error's first line and the
# others go on.
#
#   bash bench/gpu_check.sh            # from the repository root, in raylm's environment
set -euo pipefail
cd "$(dirname "$0")"
exec "${PYTHON:-python}" - <<'EOF'
import json
import os
import tempfile
import traceback

import common

common.quiet_logs()
common.print_load("start")
from raylm import LanguageModelingModel

GPT2_124M = {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024}
BERT_BASE = {"num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072,
             "max_position_embeddings": 512}
LLAMA_1B = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 2048, "vocab_size": 32000}
GPT2 = {"mlm": False, "config": GPT2_124M, "block_size": 1024, "vocab_size": 50257, "train_batch_size": 8}
RUNS = [  # (label, model_type, overrides, steps)
    ("gpt2-124M bf16 eager", "gpt2", {**GPT2, "bf16": True}, 300),
    ("gpt2-124M bf16 compiled", "gpt2", {**GPT2, "bf16": True, "torch_compile": True}, 300),
    ("bert-base mlm bf16", "bert", {"config": BERT_BASE, "block_size": 512, "vocab_size": 30522,
                                    "train_batch_size": 16, "bf16": True}, 300),
    ("gpt2-124M fp16", "gpt2", {**GPT2, "fp16": True, "bf16": False}, 300),
    ("gpt2-124M bf16 fsdp", "gpt2", {**GPT2, "bf16": True, "parallel_strategy": "fsdp"}, 200),
    ("gpt2-124M bf16 fsdp offload", "gpt2", {**GPT2, "bf16": True, "parallel_strategy": "fsdp",
                                             "fsdp_cpu_offload": True}, 100),
    ("llama-1B bf16 fsdp", "causal", {"mlm": False, "block_size": 2048, "vocab_size": 32000,
                                      "train_batch_size": 4, "bf16": True, "parallel_strategy": "fsdp"}, 100),
]

rows = []
with tempfile.TemporaryDirectory() as folder:
    train_file, _ = common.write_corpus(folder, copies=20)
    config_dir = os.path.join(folder, "llama_1b")
    os.makedirs(config_dir)
    with open(os.path.join(config_dir, "config.json"), "w") as f:
        json.dump(LLAMA_1B, f)
    for label, model_type, overrides, steps in RUNS:
        out = os.path.join(folder, label.replace(" ", "_"))
        if model_type == "causal":
            overrides = {**overrides, "config_name": config_dir}
        args = common.raylm_args(out, use_gpu=True, num_workers=1, max_steps=steps, logging_steps=steps // 6,
                                 **{"fp16": False, **overrides})
        try:
            model = LanguageModelingModel(model_type, None, args=args, train_files=train_file)
            model.train_model(train_file)
        except Exception:
            traceback.print_exc(limit=0)
            rows.append([label, None, None, None, None])
            continue
        # The vocabulary is the tokenizer's (trained on the corpus): the count says how near "124M" or "1B" a run is.
        params = sum(p.numel() for p in model.model.parameters()) / 1e6
        events = common.train_events(out)
        mfu = common.steady(events, "mfu") if "mfu" in events[-1] else None
        peak = max(e["peak_memory_mb"] for e in events)
        rows.append([label, params, common.steady(events, "tokens_per_second"), mfu, peak])
common.print_table("one GPU", ["run", "params (M)", "tokens/s", "MFU", "peak MiB"], rows)
compiled = next(row[3] for row in rows if row[0] == "gpt2-124M bf16 compiled")
print("gpt2-124M bf16 compiled MFU:", "n/a" if compiled is None else f"{compiled:.1%}", "(target >= 45%)")
common.print_load("end")
EOF
