"""Bundled example models for ``wtacrs-inspect`` and the tests.

Each factory returns ``(model, example_inputs)`` with a fixed seed, the contract of a
``module:factory`` given to ``wtacrs-inspect``.  Models are tiny and built from configs, so
they need no download and compile in seconds on a CPU; the shapes are still those of real
fine-tuning (token rows x hidden features), which is what the pass reasons about.

``transformers`` and ``timm`` are optional dependencies, imported only by the example that
needs them.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, Tuple

import torch
import torch.nn as nn

Example = Tuple[nn.Module, Any]


def _require(module: str, example: str, extra: str = "test"):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"the {example!r} example needs the optional dependency {module!r} "
            f"(pip install 'wtacrs-compile[{extra}]'): {e}"
        ) from e


def mlp(seed: int = 0) -> Example:
    """Linear-ReLU-Linear on 256 rows: the second linear's input leaves the saved set."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
    return model, (torch.randn(256, 64),)


def _hf_example(example: str, seed: int, model_class: str, config: Dict[str, Any], inputs) -> Example:
    """A Hugging Face model of ``model_class`` built from ``config`` (eager attention), and
    its inputs from ``inputs(config, generator)``, both seeded."""
    transformers = _require("transformers", example)
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config)
    return model, inputs(model.config, torch.Generator().manual_seed(seed))


def bert(seed: int = 0) -> Example:
    """A 2-layer BertForSequenceClassification (eager attention) on 4 x 64 tokens, with labels,
    so the step inspected is the backward of ``.loss``."""
    transformers = _require("transformers", "bert")
    config = transformers.BertConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=64, num_labels=2, attn_implementation="eager",
    )
    return _hf_example("bert", seed, "BertForSequenceClassification", config, lambda c, gen: {
        "input_ids": torch.randint(0, c.vocab_size, (4, 64), generator=gen),
        "attention_mask": torch.ones(4, 64, dtype=torch.long),
        "labels": torch.randint(0, 2, (4,), generator=gen),
    })


def vit(seed: int = 0) -> Example:
    """A 2-block timm ViT (fused SDPA attention) on 4 images of 32 x 32, patch 4: 65 tokens."""
    timm = _require("timm", "vit")
    torch.manual_seed(seed)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, num_classes=10, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4.0
    )
    return model, (torch.randn(4, 3, 32, 32),)


def t5(seed: int = 0) -> Example:
    """A 2+2-layer T5ForConditionalGeneration (encoder-decoder) with labels, 4 x 32 tokens."""
    transformers = _require("transformers", "t5")
    config = transformers.T5Config(
        vocab_size=512, d_model=64, d_kv=16, d_ff=256, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, attn_implementation="eager",
    )
    return _hf_example("t5", seed, "T5ForConditionalGeneration", config, lambda c, gen: {
        "input_ids": torch.randint(0, c.vocab_size, (4, 32), generator=gen),
        "labels": torch.randint(0, c.vocab_size, (4, 32), generator=gen),
    })


EXAMPLES: Dict[str, Callable[..., Example]] = {"mlp": mlp, "bert": bert, "vit": vit, "t5": t5}
"""Name -> factory, as ``wtacrs-inspect NAME`` accepts them."""
