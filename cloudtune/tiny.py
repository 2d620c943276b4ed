"""The tiny random Llama used by the offline demo and the tests.

It is written to disk once and then loaded with `from_pretrained` like any hub model, so everything
after loading is the code path a real Llama takes. Its tokenizer is byte-level: one token per UTF-8
byte, so a CPU step takes milliseconds and counting tokens needs no tokenizer library.
"""

TINY_LLAMA = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5,
                  tie_word_embeddings=False)
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def byte_token_count(text: str) -> int:
    """Tokens the tiny tokenizer makes of one document: its bytes plus BOS and EOS."""
    return len(text.encode("utf-8")) + 2
