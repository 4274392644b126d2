"""{{name}}: an output guard in Python (componentize-py).

componentize-py looks for the class of the exported interface here (`GuardPolicy`) and for
its resource in a module named after the interface (`guard_policy.GuardStream`, the file
beside this one): one guard stream per answer.
"""

from wit_world import exports


class GuardPolicy(exports.GuardPolicy):
    pass
