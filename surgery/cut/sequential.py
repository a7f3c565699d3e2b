"""Sequential compensation: refit each reader on the inputs the cut layers below give it.

Compensation from the dense model's statistics (:mod:`surgery.cut.compensation`) regresses a
reader's removed inputs on its kept ones as the *dense* model computes them. Once the model
is cut, the kept inputs are something else: every group underneath was cut too, and its
error flows up into this reader. Sequential compensation walks the cut groups bottom-up (in
the order their readers run); for each it collects the readers' input statistics on the
model as cut so far, refits the readers from them, and cuts the group in the model by
zeroing the readers' removed input columns, so that the next group is fitted on what it will
really see. It is the layer-wise reconstruction of SparseGPT and SlimGPT applied to our refit
(each reader reproduces what its dense weights would compute from the inputs it now gets);
the selection is unchanged.

The walk is one forward pass that pauses at each reader: every calibration batch is run
through the graph node by node up to the reader, holding only the values still to be used
(for a decoder, the residual stream and the attention masks), so the cost is about one more
calibration pass (a reader inside a leaf module, such as an attention's output projection,
runs its leaf twice: once observed, once refitted), and the memory is the live activations
of every calibration batch at one point of the graph. A BatchNorm the cut reaches is
re-estimated on the way, from every batch's input to it, as the BatchNorm re-estimation after
the cut will do: without it the layers above were fitted to stale statistics (ResNet-18 on
Fashion-MNIST at 75% of MACs: 0.697 against 0.776 with dense statistics).

Zeroing the readers' columns is the cut only where every reader of the group is a conv or
linear layer and nothing normalises across the group: heads, FFN neurons, a CNN's channels.
A residual stream's hidden dims pass through every LayerNorm/RMSNorm, so zeroing columns is
not removing them; such groups keep the dense statistics' refit, added after the walk, and
the groups fitted sequentially see the stream without their cut.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.fx as fx

from surgery._core.batches import as_args, split_batch, to_device
from surgery.cut.compensation import (
    apply_refits,
    reader_weight,
    refits,
    transposed_linear,
    weighted_reader,
)
from surgery.errors import SurgeryError
from surgery.graph.groups import ChannelGroup, Coupling
from surgery.stats import distributed as dist_calib
from surgery.stats._probes import align, columns, features_of, pool
from surgery.stats.calibration import Calibration
from surgery.stats.moments import MomentSums

_CUT_BY_COLUMNS = (torch.nn.Linear, torch.nn.modules.conv._ConvNd,
                   torch.nn.modules.batchnorm._BatchNorm, torch.nn.Embedding)
"""Modules whose slices of a group carry no cross-channel computation: when only these hold
a group, zeroing its readers' input columns removes it exactly."""


def cut_by_columns(coupling: Coupling, group: ChannelGroup) -> bool:
    """Whether zeroing the input columns of ``group``'s readers is the same as cutting it:
    every relation reading it has a conv/linear reader and every module it touches is a
    conv, linear, BatchNorm or embedding (no norm across the group, no attention leaf that
    mixes it by other means)."""
    model = coupling.capture.model
    gm = coupling.capture.graph_module
    for name in group.modules:
        module = model.get_submodule(name)
        if not (isinstance(module, _CUT_BY_COLUMNS) or transposed_linear(module)):
            return False
    relations = [rel for rel in coupling.relations if rel.group == group.id]
    return bool(relations) and all(weighted_reader(gm, rel)[1] is not None
                                   for rel in relations)


def sequential_refits(model: torch.nn.Module, coupling: Coupling, calib_data: Iterable[Any],
                      kept: dict[int, np.ndarray], groups: list[ChannelGroup], *,
                      max_batches: int | None = None, distributed: bool | None = None,
                      grid: int = 4, progress: Callable[[int], None] | None = None
                      ) -> list[str]:
    """Refit the readers of ``groups`` (each :func:`cut_by_columns`) in ``model`` bottom-up,
    each on the inputs ``model`` gives it with the readers below already refitted and cut;
    ``model`` is the copy about to be sliced (same module names as the traced model), changed
    in place. Under ``torch.distributed`` each rank runs its share of the batches and the
    statistics are all-reduced before every refit; ``progress(i)`` after the ``i``-th reader.
    Returns the names of the layers refitted."""
    on_copy = _on(model, coupling)
    ids = {g.id for g in groups}
    distributed = dist_calib.active() if distributed is None else distributed
    walk = _Walk(on_copy, calib_data, max_batches, distributed)
    steps: dict[str, list[int]] = {}
    for i, rel in sorted(enumerate(coupling.relations),
                         key=lambda r: walk.index[walk.node[r[1].layer]]):
        if rel.group in ids:
            steps.setdefault(rel.layer, []).append(i)
    done: list[str] = []
    for step, (layer, relations) in enumerate(steps.items()):
        stats = walk.observe(layer, relations, grid)
        found = refits(model, on_copy, stats, {g: kept[g] for g in ids})
        done += apply_refits(model, found)
        walk.cut(layer)
        for i in relations:
            removed = np.setdiff1d(np.arange(coupling.groups[coupling.relations[i].group].atoms),
                                   kept[coupling.relations[i].group])
            _zero_columns(model, on_copy, i, removed, stats.x_features[i])
        if progress is not None:
            progress(step)
    return done


class _Walk:
    """The calibration batches run through the graph together, node by node, up to a reader;
    each batch's live values (those a later node still reads) are kept between steps."""

    def __init__(self, coupling: Coupling, calib_data: Iterable[Any], max_batches: int | None,
                 distributed: bool) -> None:
        self.coupling = coupling
        gm = coupling.capture.graph_module
        self.nodes = list(gm.graph.nodes)
        self.index = {node: i for i, node in enumerate(self.nodes)}
        self.node = {node.name: node for node in self.nodes}
        self.last_use = {node: max((self.index[u] for u in node.users), default=-1)
                         for node in self.nodes}
        self.interpreter = fx.Interpreter(gm)
        self.device = next((p.device for p in gm.parameters()), torch.device("cpu"))
        self.distributed = distributed
        signature = inspect.signature(gm.forward)
        self.envs: list[dict[fx.Node, Any]] = []
        self.masks: list[torch.Tensor | None] = []
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        for _, batch in dist_calib.shard(calib_data, max_batches, distributed):
            inputs, _ = split_batch(batch)
            inputs = to_device(inputs, self.device)
            args, kwargs = as_args(inputs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            self.envs.append({n: bound.arguments[n.target] for n in placeholders})
            self.masks.append(inputs.get("attention_mask") if isinstance(inputs, dict)
                              else None)
        self.done = len(placeholders)
        self.changed: set[fx.Node] = set()

    def observe(self, layer: str, relations: list[int], grid: int) -> Calibration:
        """Run every batch up to node ``layer`` and collect the input statistics of the
        readers of ``relations`` there (running ``layer`` itself, outputs dropped, for a
        reader inside it); ``layer`` stays to be run with the refitted weights."""
        target = self.node[layer]
        self._advance(self.index[target])
        relations_of = self.coupling.relations
        result = Calibration(self.coupling)
        for i in relations:
            result.x_features[i] = features_of(relations_of[i].probe)
            result.sums[i] = MomentSums(len(result.x_features[i].atom_of_column), 0)
        inner = [i for i in relations if relations_of[i].probe.module is not None]
        gm = self.coupling.capture.graph_module
        with torch.no_grad():
            for env, mask in zip(self.envs, self.masks):
                seen: dict[int, torch.Tensor] = {}
                handles = [gm.get_submodule(relations_of[i].probe.module)
                           .register_forward_pre_hook(_keep(seen, i, relations_of[i].probe.axis,
                                                            grid)) for i in inner]
                try:
                    if inner:
                        self._run(target, env)
                finally:
                    for handle in handles:
                        handle.remove()
                for i in relations:
                    pooled = seen[i] if i in seen else self._pooled(i, env, grid)
                    x = columns(pooled, result.x_features[i])
                    result.sums[i].add(align(x, x, mask)[0])
        result.batches = len(self.envs)
        if self.distributed:
            dist_calib.all_reduce_sums(result.sums, result.batches, 0)
        return result

    def _pooled(self, relation: int, env: dict[fx.Node, Any], grid: int) -> torch.Tensor:
        """A relation's probed input, from the batch's live values."""
        rel = self.coupling.relations[relation]
        node = self.node[rel.probe.node]
        if node not in env:
            raise SurgeryError(
                f"sequential compensation cannot observe the input of {rel.layer} (node "
                f"{rel.probe.node} is not live where it runs); prune with sequential=False "
                "and report the model, please.")
        return pool(env[node], rel.probe.axis, grid)

    def _advance(self, stop: int) -> None:
        """Run the nodes before index ``stop`` for every batch, dropping dead values. A
        BatchNorm below a cut is re-estimated first on what reaches it now (as the cut model's
        will be after the cut), so the layers above are fitted to the statistics they will
        see."""
        gm = self.coupling.capture.graph_module
        with torch.no_grad():
            for node in self.nodes[self.done:stop]:
                if any(arg in self.changed for arg in node.all_input_nodes):
                    self.changed.add(node)
                    if node.op == "call_module":
                        module = gm.get_submodule(node.target)
                        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                            self._reestimate(module, node.all_input_nodes[0])
                for env in self.envs:
                    value = self._run(node, env)
                    if node.users:  # else nothing reads it: not kept
                        env[node] = value
                    for arg in node.all_input_nodes:
                        if self.last_use[arg] <= self.index[node]:
                            env.pop(arg, None)
        self.done = max(self.done, stop)

    def cut(self, layer: str) -> None:
        """Mark node ``layer`` as reading a cut group: everything it feeds has changed."""
        self.changed.add(self.node[layer])

    def _reestimate(self, norm: torch.nn.modules.batchnorm._BatchNorm, source: fx.Node
                    ) -> None:
        if not norm.track_running_stats or norm.running_mean is None:
            return
        total = torch.zeros_like(norm.running_mean, dtype=torch.float64)
        square = torch.zeros_like(total)
        n = 0
        for env in self.envs:
            x = env[source].detach().double().transpose(0, 1).reshape(total.shape[0], -1)
            total += x.sum(1)
            square += x.pow(2).sum(1)
            n += x.shape[1]
        if self.distributed:
            counts = torch.tensor([float(n)], dtype=torch.float64, device=total.device)
            for t in (total, square, counts):
                dist.all_reduce(t)
            n = int(counts.item())
        mean = total / max(n, 1)
        var = (square / max(n, 1) - mean.pow(2)) * n / max(n - 1, 1)
        norm.running_mean.copy_(mean.to(norm.running_mean.dtype))
        norm.running_var.copy_(var.clamp_min(0).to(norm.running_var.dtype))

    def _run(self, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
        self.interpreter.env = env
        return self.interpreter.run_node(node)



def _keep(seen: dict[int, torch.Tensor], i: int, axis: int, grid: int):
    def hook(module: torch.nn.Module, inputs: tuple) -> None:
        seen[i] = pool(inputs[0], axis, grid)

    return hook


def _zero_columns(model: torch.nn.Module, coupling: Coupling, relation: int,
                  removed: np.ndarray, feats: Any) -> None:
    """Cut the removed atoms out of one reader by zeroing their input columns."""
    name, _ = weighted_reader(coupling.capture.graph_module, coupling.relations[relation])
    positions = feats.positions[np.isin(feats.position_atoms, removed)]
    with torch.no_grad():
        weight = reader_weight(model.get_submodule(name))
        weight[:, torch.as_tensor(positions, device=weight.device)] = 0


def _on(model: torch.nn.Module, coupling: Coupling) -> Coupling:
    """``coupling`` over ``model``, a copy of the traced model: the same graph calling the
    copy's modules and weights (graph constants are shared), so calibrating it observes the
    copy as it is being cut."""
    gm = coupling.capture.graph_module
    root: dict[str, Any] = {}
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            try:
                root[node.target] = operator.attrgetter(node.target)(model)
            except AttributeError:  # a constant fx stored on the graph module
                root[node.target] = operator.attrgetter(node.target)(gm)
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    capture = dataclasses.replace(coupling.capture, model=model,
                                  graph_module=fx.GraphModule(root, graph))
    return dataclasses.replace(coupling, capture=capture)


__all__ = ["cut_by_columns", "sequential_refits"]
