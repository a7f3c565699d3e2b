"""The plugin API: everything a plugin may use, from one place, kept stable.

A plugin is a module with functions marked ``@hookimpl`` (every hook is documented in
:mod:`surgery.hookspecs`), registered through the ``surgery`` entry-point group. The names
below are what its hooks receive and return, and the helpers the built-in plugins are written
with; they keep their names and signatures across minor releases (a change goes through a
deprecation first). Anything imported from elsewhere in ``surgery`` is internal and may move.

* hooks: :data:`hookimpl`, :func:`plugin_manager`;
* channel rules (``surgery_module_rules`` / ``surgery_function_rules``): a rule reads and sets
  :class:`Track` lists on a :class:`Propagation`, records what a layer reads with
  :class:`Consume`; :class:`RuleTable` collects rules with decorators; the helpers are the
  building blocks of the built-in rules (elementwise ops, arguments by name, parameter ids,
  sizes read at trace time, conv/linear/norm layers, reshapes);
* leaf modules with a known layout: :class:`HeadLayout` with :func:`attention_rule` and
  :func:`fix_attention` for multi-head attention, :func:`embeddings_rule` for embeddings;
* groups (``surgery_group_kind``): :class:`ChannelGroup`;
* criteria and estimators (``surgery_criteria`` / ``surgery_estimators``): subclass
  :class:`Criterion` (scores from a :class:`ScoreContext`); an estimator reads
  :class:`MomentSums`.
"""

from surgery.graph.groups import ChannelGroup
from surgery.graph.propagate import Consume, Propagation, Track, Tracks
from surgery.graph.rules.layers import conv, embedding, linear, per_channel
from surgery.graph.rules.leaves import HeadLayout, attention_rule, embeddings_rule, fix_attention
from surgery.graph.rules.registry import RuleTable
from surgery.graph.rules.shapes import reshape_tracks
from surgery.graph.rules.tracks import (
                                        keep_leading_axes,
                                        merge_tracks,
                                        no_channels,
                                        node_args,
                                        param_ids,
                                        passthrough,
                                        pin_size_reads,
                                        pointwise,
)
from surgery.hookspecs import hookimpl
from surgery.plugins._manager import plugin_manager
from surgery.scoring.criteria import Criterion, ScoreContext
from surgery.stats.moments import MomentSums

__all__ = [
    "hookimpl", "plugin_manager",
    "Track", "Tracks", "Consume", "Propagation", "RuleTable",
    "pointwise", "passthrough", "merge_tracks", "keep_leading_axes", "no_channels",
    "node_args", "param_ids", "pin_size_reads", "reshape_tracks",
    "conv", "linear", "per_channel", "embedding",
    "HeadLayout", "attention_rule", "embeddings_rule", "fix_attention",
    "ChannelGroup", "Criterion", "ScoreContext", "MomentSums",
]
