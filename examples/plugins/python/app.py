"""A staircase aggregator in Python (componentize-py).

It relays the proposers' text to the aggregator model in arrival order under a fixed head
(instruction, then the user's question), so every step's prompt extends the previous one
and the host re-uses its cached prefix. It steps on the first text (staircase) or once at
the end (layered), like the built-in Rust aggregator, but in twenty lines of Python.

componentize-py looks for the class of an exported interface in this module
(`AggregatorPolicy`) and for its resources in a module named after the interface
(`aggregator_policy.Session`, next to this file).
"""

from wit_world import exports


class AggregatorPolicy(exports.AggregatorPolicy):
    pass
