"""The hub-free character tokenizer."""

import pytest
import torch

from trainer.data.tokenizer import CHARACTERS, SPECIAL_TOKENS, CharTokenizer


def test_vocabulary_is_fixed():
    tok = CharTokenizer()
    assert tok.vocab_size == len(tok) == len(SPECIAL_TOKENS) + len(CHARACTERS) == 105
    assert tok.pad_token_id == 0 and tok.eos_token_id == 2 and tok.bos_token_id == 1 and tok.unk_token_id == 3
    assert len(set(tok.id_to_token)) == tok.vocab_size
    assert CharTokenizer().encode("abc") == tok.encode("abc")


def test_roundtrip_math_text():
    tok = CharTokenizer()
    text = "12-5= so \\boxed{7}\n x^2 + \\frac{1}{2}"
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text


def test_unknown_characters_map_to_unk():
    tok = CharTokenizer()
    assert tok.encode("π=3") == [tok.unk_token_id, tok.encode("=")[0], tok.encode("3")[0]]
    assert tok.decode(tok.encode("π")) == "<unk>"


def test_special_tokens_in_text_are_single_ids():
    tok = CharTokenizer()
    ids = tok.encode("<bos><|user|>1+1=<|end|><|assistant|>\\boxed{2}<eos>")
    assert ids[:2] == [tok.bos_token_id, tok.token_to_id["<|user|>"]]
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "1+1=\\boxed{2}"
    assert tok.encode("1", add_special_tokens=True) == [tok.bos_token_id, tok.encode("1")[0]]
    assert tok.encode("<bo") == tok.encode("<") + tok.encode("bo")  # a partial name is plain text


def test_chat_template():
    tok = CharTokenizer()
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "3+4="}]
    text = tok.apply_chat_template(msgs)
    assert text == "<bos><|system|>be brief<|end|><|user|>3+4=<|end|><|assistant|>"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False).endswith("<|end|>")
    assert tok.apply_chat_template(msgs, tokenize=True) == tok.encode(text)
    with pytest.raises(ValueError, match="tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_decode_rejects_out_of_range():
    with pytest.raises(ValueError, match="105"):
        CharTokenizer().decode([105])
    assert CharTokenizer().batch_decode([[10, 11], []]) == [" !", ""]  # 8 specials, newline, tab, then ASCII


def test_a_tokenizer_of_remote_code_runs_only_when_the_model_trusts_it(tmp_path, matrix):
    """Moonlight's tokenizer is its repository's own Python (tiktoken): transformers refuses it without
    trust_remote_code, and on a terminal would ask; the matrix's model says whether to run it."""
    import json

    import pytest
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from trainer.tasks import hf_tokenizer

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")),
                            unk_token="<unk>").save_pretrained(tmp_path)
    (tmp_path / "own_tokenizer.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\n\nclass OwnTokenizer(PreTrainedTokenizerFast):\n"
        "    pass\n")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "own_tokenizer.OwnTokenizer"]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    r = matrix.resolve("tiny-qwen2.5")

    def with_model(trust: bool):
        model = r.model.model_copy(update={"weights": str(tmp_path), "trust_remote_code": trust})
        return r.model_copy(update={"model": model})

    with pytest.raises(ValueError, match=r"repository's own code \(own_tokenizer.OwnTokenizer\); set "
                                         r"model.trust_remote_code=true \(matrix.yaml models.tiny-qwen2.5\)"):
        hf_tokenizer(with_model(False))
    assert type(hf_tokenizer(with_model(True))).__name__ == "OwnTokenizer"
