"""Capture the joint forward/backward graph the wtacrs pass sees, without Inductor: AOTAutograd
traces a module's training step with Inductor's decompositions and hands the joint graph to a
partition function that keeps a copy.  Stage tests run the pass's stages on such copies in
well under a second (no code generation)."""

import contextlib
import copy
from dataclasses import dataclass
from typing import FrozenSet, List, Tuple

import torch
import torch.fx as fx
from functorch.compile import aot_function, default_partition, nop

import wtacrs_compile
from wtacrs_compile.passes.joint_pass import WTACRSJointPass
from wtacrs_compile.torch_internals import decompositions


@dataclass
class Joint:
    gm: fx.GraphModule  # a fresh copy per call of graph()
    params: FrozenSet[str]  # placeholder names of the parameters (primals_1..)
    static: Tuple[int, ...]  # their input positions

    def graph(self) -> fx.Graph:
        return copy.deepcopy(self.gm).graph

    def joint_pass(self, **options) -> WTACRSJointPass:
        """The pass as the backend builds it for this graph (tests/test_stages.py runs its stages)."""
        jp = WTACRSJointPass.for_compile(wtacrs_compile.WTACRSConfig.from_options(options), self.static)
        assert jp.params == self.params
        return jp


@contextlib.contextmanager
def compiling(jp: WTACRSJointPass, graph: fx.Graph):
    """What Inductor's compile provides around the pass: the compile's partitioner settings and
    the graph's fake mode as the ambient one (the partitioner looks it up)."""
    from wtacrs_compile.graph_utils import fake_mode_of

    with jp.partitioner.active(), fake_mode_of(graph):
        yield


def capture_joint(model: torch.nn.Module, *inputs: torch.Tensor) -> Joint:
    params = dict(model.named_parameters())
    names = list(params)

    def step(*args):
        bound = dict(zip(names, args[: len(names)]))
        out = torch.func.functional_call(model, bound, args[len(names):])
        return out.float().sum()

    captured: List[fx.GraphModule] = []

    def partition(joint, joint_inputs, **kw):
        captured.append(copy.deepcopy(joint))
        return default_partition(joint, joint_inputs, **kw)

    compiled = aot_function(step, fw_compiler=nop, bw_compiler=nop, partition_fn=partition,
                            decompositions=decompositions())
    compiled(*params.values(), *inputs).backward()
    static = tuple(range(len(names)))
    return Joint(captured[-1], frozenset(f"primals_{i + 1}" for i in static), static)


def count(graph: fx.Graph, target) -> int:
    return sum(1 for n in graph.nodes if n.op == "call_function" and n.target == target)
