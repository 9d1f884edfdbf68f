"""Runs inside bench/.peer-venv (Simple Transformers 0.70.8, transformers<5): one from-scratch model, timed.

Reads a JSON job from argv[1]; prints one JSON line: train_model's wall seconds, global step and the
input tokens of the epoch it trained on.
Imports and tokenizer training happen before the clock starts, as they do for raylm (both train
the tokenizer when the model is constructed).
"""

import json
import logging
import sys
import time
import warnings

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

from simpletransformers.language_modeling import LanguageModelingArgs, LanguageModelingModel  # noqa: E402


def main() -> None:
    job = json.loads(sys.argv[1])
    args = LanguageModelingArgs()
    args.output_dir = job["output_dir"]
    args.cache_dir = job["output_dir"] + "/cache"
    args.overwrite_output_dir = True
    args.reprocess_input_data = True
    args.num_train_epochs = job.get("num_train_epochs", 1)
    args.dataset_type = job.get("dataset_type", "None")  # the seed's snippets set "simple": SimpleDataset, as "None"
    args.block_size = job["block_size"]
    args.max_seq_length = job["block_size"]
    args.train_batch_size = job["batch_size"]
    args.learning_rate = job["learning_rate"]
    args.vocab_size = job["vocab_size"]
    args.config = job["config"]
    args.mlm = job["mlm"]
    args.manual_seed = job[
        "seed"
    ]  # seeds random, numpy and torch in the constructor: the model's init and the RandomSampler's order
    args.save_steps = -1
    args.save_model_every_epoch = False
    args.evaluate_during_training = False
    args.silent = True
    model = LanguageModelingModel(job["model_type"], None, args=args, train_files=job["train_file"], use_cuda=False)
    if job.get("initial_dir"):
        model.model.save_pretrained(job["initial_dir"])
        model.tokenizer.save_pretrained(job["initial_dir"])
    if job["model_type"] == "electra":
        # 0.70.8 ends train_model by saving the whole pair, which transformers 4.57 refuses (the tied embeddings
        # are shared tensors to safetensors); it then saves each half, which works, and that is what is scored.
        model.save_model = lambda *args, **kwargs: None
    started = time.perf_counter()
    global_step, _ = model.train_model(job["train_file"])
    train_seconds = time.perf_counter() - started
    # The examples it trained on (its cache, read back after the clock): their tokens, none of them padding.
    model.args.reprocess_input_data = False
    examples = model.load_and_cache_examples(job["train_file"]).examples
    print(
        json.dumps(
            {
                "train_seconds": train_seconds,
                "global_step": global_step,
                "input_tokens": int(sum(len(example) for example in examples)),
            }
        )
    )


if __name__ == "__main__":
    main()
