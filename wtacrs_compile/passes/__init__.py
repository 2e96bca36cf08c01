"""Graph passes of the ``wtacrs`` backend, one concern per file.

* :mod:`.match_matmuls`: find the weight-gradient matmuls of a joint graph (analysis only);
* :mod:`.plan_memory`: decide per matched op: sample in forward, in backward, or leave exact;
* :mod:`.sample_matmul`: rewrite a matched matmul to the WTA-CRS estimator;
* :mod:`.joint_pass`: the ``CustomGraphPass`` Inductor calls on the joint graph, tying the
  three together.
"""
