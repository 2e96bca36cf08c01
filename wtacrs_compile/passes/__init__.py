"""Graph passes of the ``wtacrs`` backend, one concern per file.

* :mod:`.match_matmuls`: find the weight-gradient matmuls of linear layers (analysis only);
* :mod:`.match_bmm`: find the operand-gradient bmms of attention products (analysis only);
* :mod:`.keep_random`: keep random ops (dropout) out of recomputation, which torch's
  memory-budget partitioner would redraw in backward;
* :mod:`.hash_rng`: draw dropout masks with an integer hash Inductor vectorizes, so that
  backward recomputes them for little;
* :mod:`.plan_memory`: decide per matched op: sample in forward, in backward, or leave exact;
* :mod:`.sample_matmul`: rewrite a matched linear's weight-gradient matmul to WTA-CRS;
* :mod:`.sample_bmm`: rewrite a matched bmm, one draw per (batch, head);
* :mod:`.pack_masks`: store the boolean masks saved for backward as packed bits;
* :mod:`.meet_budget`: Inductor's ``custom_partitioner_fn``: hold the partition to
  ``memory_budget`` in counted bytes, partitioning again under a tighter budget where torch's
  solver overshoots it;
* :mod:`.joint_pass`: the ``CustomGraphPass`` Inductor calls on the joint graph, tying them
  together.
"""
