"""Checks of the committed multilingual Whisper tokenizer fixture.

The fixture (tests/fixtures/whisper_tokenizer) is built by
scripts/build_tokenizer_fixture.py from OpenAI's multilingual.tiktoken and
stands in for the tokenizer of openai/whisper-{tiny,base,small,medium}.
These tests only read the committed files: offline, no tiktoken needed.
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import WhisperProcessor, WhisperTokenizerFast  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "whisper_tokenizer"

# Expected ids were produced by tiktoken itself (tiktoken.Encoding built from
# multilingual.tiktoken with whisper's pat_str, as in whisper.tokenizer.get_encoding),
# not by the tokenizer under test.
TIKTOKEN_ENCODINGS = [
    (" Hello world", [2425, 1002]),
    ("Hello world", [15947, 1002]),
    (" hello world", [7751, 1002]),
    (" Hello, world!", [2425, 11, 1002, 0]),
    ("Hello world.", [15947, 1002, 13]),
    ("  double space", [220, 3834, 1901]),
    ("trailing space ", [17227, 4883, 1901, 220]),
    (
        "It's fine, isn't it? We'll see, they'd've known.",
        [3522, 311, 2489, 11, 1943, 380, 309, 30, 492, 603, 536, 11, 436, 1116, 600, 2570, 13],
    ),
    (" The quick brown fox jumps over the lazy dog.", [440, 1702, 6292, 21026, 16704, 670, 264, 14847, 3000, 13]),
    (" 0 1 12 123 1234 12345", [1958, 502, 2272, 34466, 2272, 12249, 34466, 8465]),
    (" 3.14159, -42 and 1,000,000.", [805, 13, 7271, 5211, 24, 11, 359, 15628, 293, 502, 11, 1360, 11, 1360, 13]),
    (" In 1999 I paid $19.99 (50% off)!", [682, 19952, 286, 4835, 1848, 3405, 13, 8494, 522, 2803, 4, 766, 36380]),
    (" Call +1-555-0100 at 10:30am.", [7807, 4667, 16, 12, 13622, 20, 12, 15, 6879, 412, 1266, 25, 3446, 335, 13]),
    ("你好，世界！", [26410, 171, 120, 234, 24486, 171, 120, 223]),
    (" 我们今天去北京。", [8624, 9497, 12074, 6734, 26668, 31375, 1543]),
    ("中文和English混合123", [5975, 17174, 12565, 31254, 1933, 48640, 14245, 4762, 18]),
    (" Guten Morgen, wie geht's?", [42833, 35570, 11, 3355, 7095, 311, 30]),
    (
        " Grüße aus Köln: Straße, Äpfel & Übermaß.",
        [38908, 11451, 3437, 591, 13072, 77, 25, 43817, 11, 13700, 25302, 338, 3693, 18086, 1696, 2536, 13],
    ),
    (
        " Die Größe des Hauses beträgt 120 Quadratmeter.",
        [3229, 45778, 11451, 730, 4064, 8355, 778, 11397, 10463, 10411, 29619, 4481, 33058, 13],
    ),
    (" Привет, как дела?", [38932, 11, 3014, 46157, 30]),
    (" こんにちは、世界。", [14384, 3225, 35752, 1231, 24486, 1543]),
    (" 안녕하세요 세계", [19289, 40179]),
    (" مرحبا بالعالم", [3714, 2288, 5016, 3555, 995, 20666, 3615, 45340]),
    (" ¿Dónde está la biblioteca?", [3841, 35, 812, 16404, 3192, 635, 34344, 1370, 496, 30]),
    (" C'est l'été à Paris.", [383, 6, 377, 287, 6, 21210, 1531, 8380, 13]),
    ('...!?;:"()[]{}<>', [485, 7323, 26, 31330, 45191, 58, 60, 90, 92, 27, 29]),
    (" -- hyphen-ated — em dash – en dash …", [1350, 2477, 47059, 12, 770, 3466, 846, 8240, 1662, 465, 8240, 5799]),
    ("line one\nline two\n\nline three", [1889, 472, 198, 1889, 732, 198, 198, 1889, 1045]),
    ("tab\tseparated\tvalues", [83, 455, 197, 405, 2181, 770, 197, 46033]),
    (" emoji 🙂🎉!", [31595, 7385, 247, 224, 28864, 231, 0]),
    (
        " #hashtag @user https://example.com/a?b=c",
        [3536, 12438, 357, 559, 10428, 18088, 34426, 21492, 3121, 335, 781, 13, 1112, 14, 64, 30, 65, 28, 66],
    ),
]

SPECIAL_IDS = {
    "<|endoftext|>": 50257,
    "<|startoftranscript|>": 50258,
    "<|en|>": 50259,
    "<|zh|>": 50260,
    "<|de|>": 50261,
    "<|su|>": 50357,  # 99th and last language of the pre-v3 models
    "<|translate|>": 50358,
    "<|transcribe|>": 50359,
    "<|startoflm|>": 50360,
    "<|startofprev|>": 50361,
    "<|nocaptions|>": 50362,  # hub spelling for tiny..medium; openai-whisper calls it <|nospeech|>
    "<|notimestamps|>": 50363,
    "<|0.00|>": 50364,
    "<|0.02|>": 50365,
    "<|30.00|>": 51864,
}


@pytest.fixture(scope="module")
def tok():
    """A fresh tokenizer per module (set_prefix_tokens mutates it)."""
    return WhisperTokenizerFast.from_pretrained(FIXTURE)


def test_processor_loads():
    processor = WhisperProcessor.from_pretrained(FIXTURE)
    assert processor.feature_extractor.feature_size == 80
    assert processor.feature_extractor.sampling_rate == 16000
    assert len(processor.tokenizer) == 51865


def test_vocab_size_and_basic_specials(tok):
    assert len(tok) == 51865
    assert tok.eos_token_id == tok.bos_token_id == tok.pad_token_id == tok.unk_token_id == 50257
    assert "<|yue|>" not in tok.get_vocab()  # 99 languages, not large-v3's 100


@pytest.mark.parametrize("token, idx", SPECIAL_IDS.items())
def test_special_token_ids(tok, token, idx):
    assert tok.convert_tokens_to_ids(token) == idx
    assert tok.convert_ids_to_tokens(idx) == token


def test_all_timestamp_ids_are_contiguous(tok):
    ids = tok.convert_tokens_to_ids([f"<|{i * 0.02:.2f}|>" for i in range(1501)])
    assert ids == list(range(50364, 51865))


def test_control_tokens_are_special(tok):
    specials = set(tok.all_special_ids)
    assert set(range(50257, 50364)) <= specials
    assert 50364 not in specials  # timestamps are regular added tokens, as on the hub


@pytest.mark.parametrize("text, expected", TIKTOKEN_ENCODINGS)
def test_encoding_matches_tiktoken(tok, text, expected):
    assert tok(text, add_special_tokens=False).input_ids == expected


@pytest.mark.parametrize("text, expected", TIKTOKEN_ENCODINGS)
def test_decode_round_trip(tok, text, expected):
    assert tok.decode(expected) == text


def test_default_prefix_and_eos(tok):
    # No language/task set: <|startoftranscript|><|notimestamps|> ... <|endoftext|>
    assert tok(" Hello world").input_ids == [50258, 50363, 2425, 1002, 50257]


def test_set_prefix_tokens():
    tok = WhisperTokenizerFast.from_pretrained(FIXTURE)
    tok.set_prefix_tokens(language="german", task="transcribe")
    assert tok(" Hallo").input_ids == [50258, 50261, 50359, 50363, 21242, 50257]
    tok.set_prefix_tokens(language="zh", task="translate", predict_timestamps=True)
    assert tok(" Hallo").input_ids == [50258, 50260, 50358, 21242, 50257]


def test_skip_special_tokens(tok):
    ids = [50258, 50260, 50359, 50363, 2425, 1002, 50257]
    assert tok.decode(ids, skip_special_tokens=True) == " Hello world"
    assert tok.decode(ids) == "<|startoftranscript|><|zh|><|transcribe|><|notimestamps|> Hello world<|endoftext|>"
    # timestamp tokens are dropped from the text unless decode_with_timestamps=True
    assert tok.decode([50364, 2425, 50414], skip_special_tokens=True) == " Hello"
    assert tok.decode([50364, 2425, 50414], decode_with_timestamps=True) == "<|0.00|> Hello<|1.00|>"
