"""{{name}}: an aggregator plugin in Python (componentize-py).

componentize-py looks for the class of the exported interface here (`AggregatorPolicy`)
and for its resource in a module named after the interface (`aggregator_policy.Session`,
the file beside this one): one session per pipeline run.
"""

from wit_world import exports


class AggregatorPolicy(exports.AggregatorPolicy):
    pass
