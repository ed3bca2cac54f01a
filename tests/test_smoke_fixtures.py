"""The shared fixtures themselves: the tiny model loads and its tokenizer agrees with bertstream's."""

from pathlib import Path

from common.vocab import Vocabulary, load_tokenizer


def test_tiny_model_loads_with_transformers_and_bertstream(tiny_model_dir: Path):
    from transformers import AutoTokenizer, BertForPreTraining

    model = BertForPreTraining.from_pretrained(tiny_model_dir)
    hf = AutoTokenizer.from_pretrained(tiny_model_dir)
    ours = load_tokenizer(tiny_model_dir, do_lower_case=True)
    vocab = Vocabulary.from_tokenizer(ours, do_lower_case=True)
    assert vocab.size == model.config.vocab_size == len(hf)
    text = "The river stones were shining quietly."
    assert ours.encode(text, add_special_tokens=False).ids == hf(text, add_special_tokens=False)["input_ids"]
