"""parallel_strategy fsdp, 2 ranks: each rank's peak host memory (resident set high-water) while it sets the model up,
at start-up and at a resume, the old way against raylm's.

- start-up, old: every rank receives the whole model (as ray.get hands it over: the pickled object read from a
  mapping) and shards it. New (model_setup.builds_on_meta): every rank shards the model's meta skeleton, and rank 0
  alone receives the whole model and broadcasts it into the shards (parallelism.load_from_rank0).
- resume, old: every rank loads the whole Hugging Face checkpoint and the whole optimizer.pt (what an FSDP checkpoint
  held before it was sharded), shards the model and loads the optimizer state. New: every rank shards the skeleton
  and reads its part of the checkpoint's DCP shards, weights and AdamW moments (sharded_state.load_sharded_state).

Two processes on a gloo group, as two CPU workers would run it (Ray Train's workers run the same functions); the
figure per rank is the peak resident set during the set-up less the resident set before it (torch and transformers
imported). Both ways run in the same processes, the peak reset between them (/proc/self/clear_refs).

    python bench/fsdp_memory.py            # GPT-2 of 204M parameters (1024 wide, 12 layers, 50,257 tokens)
    python bench/fsdp_memory.py --smoke
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import pickle
import subprocess
import sys
import tempfile

import common

CONFIGS = {
    "204M": {"n_embd": 1024, "n_layer": 12, "n_head": 16, "n_positions": 1024, "vocab_size": 50257},
    "smoke": {**common.MODEL_CONFIGS[("gpt2", "smoke")], "vocab_size": common.VOCAB_SIZE},
}
WAYS = ("start-up, old", "start-up, new", "resume, old", "resume, new")


def _memory_kb(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _ray_get(path: str):
    """The object pickled at `path`, unpickled from a read-only mapping of it: what ray.get does with the object
    store's shared memory."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        return pickle.loads(mapped)


def _set_up(way: str, rank: int, folder: str) -> None:
    import torch

    from raylm.config import LanguageModelingArgs
    from raylm.models.modeling import CLM, load_trained
    from raylm.training.optim import build_optimizer
    from raylm.training.parallelism import load_from_rank0, load_optimizer_state, shard_model
    from raylm.training.sharded_state import load_sharded_state

    cpu, args = torch.device("cpu"), LanguageModelingArgs(parallel_strategy="fsdp")
    if way == "start-up, old":
        shard_model(_ray_get(os.path.join(folder, "model.pkl")), cpu, None, False)
    elif way == "start-up, new":
        whole = _ray_get(os.path.join(folder, "model.pkl")) if rank == 0 else None
        model = shard_model(_ray_get(os.path.join(folder, "skeleton.pkl")), cpu, None, False)
        load_from_rank0(model, whole)
    elif way == "resume, old":
        model = shard_model(load_trained(CLM, os.path.join(folder, "hf")), cpu, None, False)
        optimizer = build_optimizer(model, args, cpu)
        saved = torch.load(os.path.join(folder, "hf", "optimizer.pt"), weights_only=True)
        load_optimizer_state(model, optimizer, saved)
    else:
        model = shard_model(_ray_get(os.path.join(folder, "skeleton.pkl")), cpu, None, False)
        load_sharded_state(os.path.join(folder, "sharded"), model, build_optimizer(model, args, cpu))


def _write_sharded_checkpoint(folder: str) -> None:
    """This rank's shards of the model and of its AdamW moments into folder/sharded, as an FSDP run checkpoints."""
    import torch

    from raylm.config import LanguageModelingArgs
    from raylm.training.optim import build_optimizer
    from raylm.training.parallelism import shard_model
    from raylm.training.sharded_state import save_sharded_state

    model = shard_model(_ray_get(os.path.join(folder, "model.pkl")), torch.device("cpu"), None, False)
    optimizer = build_optimizer(model, LanguageModelingArgs(), torch.device("cpu"))
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    save_sharded_state(os.path.join(folder, "sharded"), model, optimizer)


def rank_main(rank: int, folder: str) -> None:
    """One rank: each way in turn, its resident-set growth (MB) written to folder/rank{rank}.json."""
    import torch.distributed as dist

    libc = ctypes.CDLL("libc.so.6")
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    for name in ("warm-up", "measured"):
        _write_sharded_checkpoint(os.path.join(folder, name))
    for way in WAYS:
        # The first call of each way imports and initialises what it uses (FSDP, DCP, the model's code): on the
        # smoke-size model, so that the measured calls count only the model's memory.
        _set_up(way, rank, os.path.join(folder, "warm-up"))
    grown = {}
    for way in WAYS:
        gc.collect()
        libc.malloc_trim(0)  # what the last way freed goes back to the system, not into this one's figure
        dist.barrier()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident set (VmHWM) to the current one
        before = _memory_kb("VmRSS")
        _set_up(way, rank, os.path.join(folder, "measured"))
        dist.barrier()
        grown[way] = (_memory_kb("VmHWM") - before) / 1024
    with open(os.path.join(folder, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(grown, f)
    dist.destroy_process_group()


def prepare(folder: str, config: dict) -> float:
    """Into `folder`: the pickled model and its skeleton, and its Hugging Face checkpoint with optimizer.pt (AdamW
    moments made by one step); the model's MB. The ranks write its sharded checkpoint themselves."""
    os.makedirs(folder)
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from raylm.config import LanguageModelingArgs
    from raylm.training.model_setup import meta_skeleton
    from raylm.training.optim import build_optimizer

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**config))
    optimizer = build_optimizer(model, LanguageModelingArgs(), torch.device("cpu"))
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    model.zero_grad(set_to_none=True)
    with open(os.path.join(folder, "model.pkl"), "wb") as f:
        pickle.dump(model, f, protocol=5)
    with open(os.path.join(folder, "skeleton.pkl"), "wb") as f:
        pickle.dump(meta_skeleton(model), f, protocol=5)
    model.save_pretrained(os.path.join(folder, "hf"))
    torch.save(optimizer.state_dict(), os.path.join(folder, "hf", "optimizer.pt"))
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def main() -> None:
    parser = common.argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, help=argparse_hidden())
    parser.add_argument("--folder", help=argparse_hidden())
    options = parser.parse_args()
    if options.rank is not None:
        rank_main(options.rank, options.folder)
        return
    common.quiet_logs()
    common.begin_measuring(options)
    size = "smoke" if options.smoke else "204M"
    with tempfile.TemporaryDirectory() as folder:
        prepare(os.path.join(folder, "warm-up"), CONFIGS["smoke"])
        model_mb = prepare(os.path.join(folder, "measured"), CONFIGS[size])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([common.REPO, os.environ.get("PYTHONPATH", "")])}
        ranks = [
            subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--rank", str(rank), "--folder", folder],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for rank in (0, 1)
        ]
        for process in ranks:
            _, errors = process.communicate()
            if process.returncode:
                raise RuntimeError(f"a rank failed:\n{errors.decode()[-3000:]}")
        grown = [json.load(open(os.path.join(folder, f"rank{rank}.json"), encoding="utf-8")) for rank in (0, 1)]
    rows = []
    for phase in ("start-up", "resume"):
        old, new = (grown_by_rank(grown, f"{phase}, {way}") for way in ("old", "new"))
        # At --smoke size the model is a few hundred KB, below what the resident set shows: no ratio there.
        rows.append([phase, *old, *new, *(f"{n / o:.2f}" if o >= 1 else "n/a" for o, n in zip(old, new))])
    common.print_table(
        f"FSDP set-up, GPT-2 of {model_mb:,.0f} MB (float32), 2 ranks on gloo: peak resident set growth per rank (MB)",
        ["phase", "old rank 0", "old rank 1", "new rank 0", "new rank 1", "new/old rank 0", "new/old rank 1"],
        rows,
    )
    common.print_load("end")


def grown_by_rank(grown: list[dict], way: str) -> list[float]:
    return [round(g[way], 1) for g in grown]


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
