"""Instance building byte for byte on hand-made examples (byte tokenizer: one token per byte)."""
import pytest
import torch

from mamlen.train.instances import IGNORE_INDEX, build_instance, collate, encode_parts

pytestmark = pytest.mark.usefixtures("one_thread")


def ex(i, o, opts=()):
    return {"task": "t", "input": i, "output": o, "options": list(opts)}


def decode(tok, ids):
    return tok.decode(ids)


def target_text(tok, inst):
    return tok.decode([t for t in inst["labels"] if t != IGNORE_INDEX])


def check_mask(inst):
    """Labels are -100 up to the target, then equal to input_ids to the end."""
    n = sum(t != IGNORE_INDEX for t in inst["labels"])
    assert inst["labels"][:-n] == [IGNORE_INDEX] * (len(inst["labels"]) - n)
    assert inst["labels"][-n:] == inst["input_ids"][-n:]


def test_direct_layout(byte_tok):
    demos = [ex("a b", "x"), ex("cc", "yy")]
    inst = build_instance(byte_tok, demos, ex("q?", "zz"))
    assert decode(byte_tok, inst["input_ids"]) == "a b\nx\n\n\ncc\nyy\n\n\nq?\nzz"
    assert inst["input_ids"] == byte_tok("a b\nx\n\n\ncc\nyy\n\n\nq?\nzz", add_special_tokens=False)["input_ids"]
    assert target_text(byte_tok, inst) == "zz"
    check_mask(inst)
    assert sum(t != IGNORE_INDEX for t in inst["labels"]) == 2


def test_target_overrides_output_and_zero_shot(byte_tok):
    inst = build_instance(byte_tok, [], ex("in", "gold"), target="opt")
    assert decode(byte_tok, inst["input_ids"]) == "in\nopt"
    assert target_text(byte_tok, inst) == "opt"


def test_channel_swaps_roles(byte_tok):
    demos = [ex("a b", "x"), ex("cc", "yy")]
    inst = build_instance(byte_tok, demos, ex("q?", "zz"), method="channel", target="w")
    assert decode(byte_tok, inst["input_ids"]) == "x\na b\n\n\nyy\ncc\n\n\nw\nq?"
    assert target_text(byte_tok, inst) == "q?"  # P(input | output)
    check_mask(inst)


def test_per_example_truncation_cuts_input_first(byte_tok):
    # 6 tokens per example: "\n" takes 1, the output 2, so the input keeps its first 3 bytes
    inst = build_instance(byte_tok, [ex("abcdefgh", "xy")], ex("ABCDEFGH", "XY"), max_example_len=6)
    assert decode(byte_tok, inst["input_ids"]) == "abc\nxy\n\n\nABC\nXY"
    assert target_text(byte_tok, inst) == "XY"
    # an output longer than the budget: the input is gone, the output keeps its first 5 bytes
    inst = build_instance(byte_tok, [ex("ab", "123456789")], ex("q", "longtarget"), max_example_len=6)
    assert decode(byte_tok, inst["input_ids"]) == "\n12345\n\n\n\nlongt"
    assert target_text(byte_tok, inst) == "longt"


def test_channel_truncation_still_cuts_input_first(byte_tok):
    inst = build_instance(byte_tok, [ex("abcdefgh", "xy")], ex("ABCDEFGH", "XY"), method="channel",
                          max_example_len=6)
    assert decode(byte_tok, inst["input_ids"]) == "xy\nabc\n\n\nXY\nABC"
    assert target_text(byte_tok, inst) == "ABC"


def test_separators_count_toward_max_len_only(byte_tok):
    # example = 4 tokens exactly; the "\n\n\n" after it does not count against max_example_len=4
    inst = build_instance(byte_tok, [ex("ab", "c")], ex("de", "f"), max_example_len=4)
    assert decode(byte_tok, inst["input_ids"]) == "ab\nc\n\n\nde\nf"


def test_whole_sequence_left_truncation(byte_tok):
    demos = [ex("first", "1"), ex("second", "2")]
    full = "first\n1\n\n\nsecond\n2\n\n\nthird\n3"
    for max_len in (len(full), len(full) - 1, 14, 7):
        inst = build_instance(byte_tok, demos, ex("third", "3"), max_len=max_len)
        assert decode(byte_tok, inst["input_ids"]) == full[-max_len:]
        assert len(inst["input_ids"]) == len(inst["labels"]) == max_len
        assert target_text(byte_tok, inst) == "3"
        check_mask(inst)


def test_default_limits_256_and_1024(byte_tok):
    long_in = "x" * 400
    demos = [ex(long_in, "yes")] * 5
    inst = build_instance(byte_tok, demos, ex(long_in, "no"))
    assert len(inst["input_ids"]) == 1024  # 5 demos * (256 + 3) + 256 > 1024: left-truncated
    text = decode(byte_tok, inst["input_ids"])
    # each example is cut to 256 tokens by its input: demos 252 + "\n" + "yes", query 253 + "\n" + "no"
    full = ("x" * 252 + "\nyes" + "\n\n\n") * 5 + "x" * 253 + "\nno"
    assert text == full[-1024:]
    assert target_text(byte_tok, inst) == "no"


def test_pieces_are_tokenized_separately(byte_tok):
    ctx, cond, tgt = encode_parts(byte_tok, [ex("a", "b")], ex("c", "d"))
    assert (decode(byte_tok, ctx), decode(byte_tok, cond), decode(byte_tok, tgt)) == ("a\nb\n\n\n", "c\n", "d")


def test_errors(byte_tok):
    with pytest.raises(ValueError, match="method"):
        build_instance(byte_tok, [], ex("a", "b"), method="noisy")
    with pytest.raises(ValueError, match="empty target"):
        build_instance(byte_tok, [], ex("a", ""))
    with pytest.raises(ValueError, match="max_example_len"):
        build_instance(byte_tok, [], ex("a", "b"), max_example_len=1)


def test_collate_right_pads_and_masks(byte_tok):
    a = build_instance(byte_tok, [], ex("ab", "c"))
    b = build_instance(byte_tok, [ex("x", "y")], ex("ab", "cd"))
    batch = collate([a, b], pad_token_id=999)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    T = len(b["input_ids"])
    assert batch["input_ids"].shape == (2, T) and batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][0].tolist() == a["input_ids"] + [999] * (T - len(a["input_ids"]))
    assert batch["attention_mask"][0].tolist() == [1] * len(a["input_ids"]) + [0] * (T - len(a["input_ids"]))
    assert batch["labels"][0].tolist() == a["labels"] + [IGNORE_INDEX] * (T - len(a["labels"]))
    assert batch["labels"][1].tolist() == b["labels"]
    with pytest.raises(ValueError, match="empty"):
        collate([], 0)
    with pytest.raises(ValueError, match="pad_token_id"):
        collate([a], None)
