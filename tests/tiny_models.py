"""Small model configs the tests share (built from configs: no download)."""


def tiny_bert_classifier(layers: int = 1):
    """A HF BERT sequence classifier, hidden 32, dropout off (exact gradients are
    deterministic), problem type fixed (else HF sets it on the first call: a recompile)."""
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, attn_implementation="eager",
        problem_type="single_label_classification",
    )
    return transformers.BertForSequenceClassification(cfg)
