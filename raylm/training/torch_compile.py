"""torch_compile: the (maybe DDP-wrapped) model -> compiled in place, the wrapper and the module it wraps; each
step's wall time and dynamo's graph counter -> the compile seconds, graphs and recompilations a progress report carries.
"""

from __future__ import annotations

import contextlib
import time
from typing import Optional

import torch

from raylm.training.parallelism import unwrap


def compile_model(model: torch.nn.Module) -> "CompileStats":
    """torch_compile: compile the model in place (a DDP wrapper itself, and the module it wraps); the compile
    statistics, counted from now.

    Under DDP, dynamo's DDPOptimizer splits the compiled graph at DDP's gradient buckets, so a bucket's all-reduce
    starts while the backward of the layers before it still runs (one fused backward would make every gradient
    ready at its end). It applies to any frame dynamo converts while DDP.forward runs the module inside
    `_inside_ddp_forward`, which names the active DDP module that dynamo's convert_frame asks for (torch 2.13), and
    compiling the wrapper, as torch documents it, keeps DDP's own forward in the compiled region. Evaluation runs the
    unwrapped module outside DDP, so that is compiled too (its own graph: eval mode, no gradients).
    In place (Module.compile, not torch.compile(model)): the state_dict keeps plain names for the checkpoint (no
    `_orig_mod.`), and the helpers that look through DDP's `.module` see the model as before.
    dynamic=True: the last step of an epoch has a shorter batch, and static shapes would recompile for it.
    """
    import torch._dynamo

    # An MLM step's masked positions reach the model through the output layer's pre-hook closure
    # (modeling._rows_selected), which dynamo counts as a module property and, by default, keeps static:
    # their count, new each batch, recompiled every step (seen: 30 -> 41 -> 37 targets, one graph each)
    # until dynamo's cache limit sent the model back to eager.
    torch._dynamo.config.force_nn_module_property_static_shapes = False
    # Unspecialized, a Python float the model reads (transformers' GELU reads math.pi) becomes a graph input, and
    # where DDPOptimizer splits the graph, AOTAutograd fails on the piece that passes it on ("'float' object has no
    # attribute 'meta'", torch 2.13; seen on 2 ranks with GPT-2s of 2 to 4 blocks, 128 wide). Specialized, such
    # floats are constants: the model's forward takes no float argument that could change between steps.
    torch._dynamo.config.specialize_float = True
    model.compile(dynamic=True)
    if unwrap(model) is not model:
        unwrap(model).compile(dynamic=True)
    return CompileStats()


class CompileStats:
    """torch_compile: wall seconds of the steps during which dynamo compiled a graph, and the graphs compiled after
    the first step.

    A step that compiles is almost all compile (host work), so its wall time stands for the compile
    cost. dynamo's counters are per process; these count from the loop's start, so the graphs the process
    compiled before (an earlier run in the driver, in_process.py) are not this run's.
    """

    def __init__(self):
        self.compile_seconds = 0.0
        self.graphs_before = self._graphs()
        self.graphs_after_first_step: Optional[int] = None

    @staticmethod
    def _graphs() -> int:
        from torch._dynamo.utils import counters

        return counters["stats"]["unique_graphs"]

    @contextlib.contextmanager
    def step(self):
        graphs, started = self._graphs(), time.perf_counter()
        yield
        if self._graphs() > graphs:
            self.compile_seconds += time.perf_counter() - started
        if self.graphs_after_first_step is None:
            self.graphs_after_first_step = self._graphs()

    def metrics(self) -> dict:
        graphs = self._graphs()
        return {
            "compile_seconds": self.compile_seconds,
            "compiled_graphs": graphs - self.graphs_before,
            # Graphs compiled after this session's first step: new shapes, or evaluation's eval/inference mode.
            "recompilations": graphs
            - (self.graphs_after_first_step if self.graphs_after_first_step is not None else graphs),
        }
