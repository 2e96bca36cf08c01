"""Graph helpers the passes rely on for correctness of shared draws and saved-byte accounting."""

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from wtacrs_compile.graph_utils import strip_views, view_key


def test_view_key_tells_equal_shaped_views_apart():
    def f(x):
        a = x.reshape(8, 4)
        b = x.reshape(8, 4)  # same view again: same rows
        c = x.permute(1, 0, 2).reshape(8, 4)  # same shape, other row order
        q, k = x.reshape(8, 4).split(2, dim=1)  # same shapes, other columns
        return a, b, c, q, k

    gm = make_fx(f)(torch.randn(2, 4, 4))
    out = gm.graph.find_nodes(op="output")[0].args[0]
    a, b, c, q, k = out
    assert view_key(a) == view_key(b)
    assert view_key(a) != view_key(c)
    assert view_key(q) != view_key(k)
    x = gm.graph.find_nodes(op="placeholder")[0]
    assert all(strip_views(n) is x for n in (a, b, q, k))
    assert strip_views(c) is not x  # reshaping a permuted tensor copies: not an alias
