#!/usr/bin/env python3
"""Writes tests/fixtures/tokenizer/*.json: llama.cpp's token ids for a fixed
set of texts, used to check Kiln's tokenizer (crates/kiln-engine/src/tokenizer)
id for id in crates/kiln-engine/tests/tokenizer_llamacpp.rs.

One file per model:
  smollm2-135m.json   SmolLM2-135M-Instruct: byte-level BPE, pre = smollm
  gemma3-270m.json    Gemma-3-270M: SentencePiece with byte fallback and many
                      user-defined tokens

For every text, the ids are llama.cpp's
    Llama(model_path, vocab_only=True).tokenize(text.encode(),
                                                 add_bos=<model default>,
                                                 special=False)
which is what Kiln's `Tokenizer::encode(text, add_bos_by_default())` must
return. Each `special` case is a chat prompt given as template/text segments;
its ids are llama.cpp's tokenization of the concatenated string with
special=True, which `Tokenizer::encode_segments` must return.

Usage (from the repository root; needs `pip install llama-cpp-python`):

    python3 scripts/make_tokenizer_fixtures.py [--models-dir DIR]

DIR defaults to $KILN_TEST_HOME/models (KILN_TEST_HOME defaults to
~/.cache/kiln/home), where `kiln pull smollm2-135m` / `kiln pull gemma3-270m`
put the models. Tokenization is deterministic, so re-running rewrites the
same files.

Differential fuzzing (not committed; for checking changes to the tokenizer):

    python3 scripts/make_tokenizer_fixtures.py --fuzz 2000 --model PATH \
        [--pre NAME] --out /tmp/cases.json
    KILN_TOKENIZER_CASES=/tmp/cases.json \
        cargo test -p kiln-engine --test tokenizer_llamacpp -- --ignored

writes N random texts built from tricky pieces (white-space runs, digits,
contractions, CJK, marks, emoji, special-token look-alikes, ...) with
llama.cpp's ids, both plain (special=False) and parsed (special=True).
`--pre` first writes a vocabulary-only copy of the GGUF under /tmp with
`tokenizer.ggml.pre` replaced, to exercise another pre-tokenizer with a real
BPE vocabulary.
"""

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
from pathlib import Path

import llama_cpp

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "tests" / "fixtures" / "tokenizer"
COMMAND = "python3 scripts/make_tokenizer_fixtures.py"

LONG_PARAGRAPH = (
    "The history of computing is often told as a sequence of machines, but it "
    "is just as much a history of ideas about representation. Early engineers "
    "argued over whether numbers should be stored in decimal or binary; later, "
    "programmers argued over character sets, byte orders and line endings. "
    "Each of those arguments left fossils behind: a carriage return before "
    "every newline in one operating system, a byte-order mark at the start of "
    "a text file in another, and thousands of code pages that map the same "
    "byte to different letters. Unicode was meant to end the quarrel, and for "
    "the most part it did, yet it brought subtleties of its own: combining "
    "accents, characters that look identical but differ, emoji assembled from "
    "several code points joined by invisible glue, and scripts written right "
    "to left. A tokenizer for a language model inherits all of this. It must "
    "cut text into pieces the model has seen during training, and it must do "
    "so exactly the same way every time, because a single different split "
    "changes the numbers the model sees. In 2023 alone, 1,234 projects "
    "reported tokenizer mismatches; about 3.5% of them were caused by "
    "whitespace handling, and the rest by everything else."
)

TEXTS = [
    ("empty", ""),
    ("hello", "Hello, world!"),
    ("contractions_digits", "I'm sure they'll say it's 3.14159, not 1234567."),
    (
        "contractions_case",
        "We've been there; you'd know. She's not HE'S -- I'LL DO IT, they'RE sure.",
    ),
    ("apostrophes", "'s 's 'S 'll 'LL 'Re rock'n'roll ''double'' don't"),
    ("chinese", "我们今天去公园散步，天气非常好。"),
    ("japanese", "東京は日本の首都です。ひらがなとカタカナも使います。"),
    ("korean", "안녕하세요, 만나서 반갑습니다! 한국어 텍스트입니다."),
    (
        "python",
        "def fib(n: int) -> int:\n"
        '    """Return the n-th Fibonacci number."""\n'
        "    if n < 2:\n"
        "        return n\n"
        "    return fib(n - 1) + fib(n - 2)\n"
        "\n"
        "\n"
        "print([fib(i) for i in range(10)])\n",
    ),
    (
        "rust",
        "fn main() {\n"
        "    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n"
        "    for (i, x) in v.iter().enumerate() {\n"
        "        if *x > 10 {\n"
        '            println!("{i}: {x}");\n'
        "        }\n"
        "    }\n"
        "}\n",
    ),
    ("tabs_spaces", "\tindented\t\ttabs\t\t\t and    four spaces        eight"),
    ("newlines", "line one\n\nline two\n\n\n\nline three\r\nwindows\r\n\r\nend"),
    ("leading_trailing_spaces", "   leading and trailing   "),
    ("single_space", " "),
    ("single_newline", "\n"),
    ("long_runs", "x" + " " * 40 + "y" + "\n" * 40 + "z" + "\t" * 35),
    ("emoji_zwj", "Family: 👩‍👩‍👧‍👦 and 👨‍💻 coding 👍🏽"),
    ("flags", "Flags: 🇺🇸🇯🇵🇫🇷 🏳️‍🌈"),
    ("cjk_ext_b", "Rare: 𠀀𠀁𪚥 𡃁 ext-B"),
    ("private_use", "PUA: \ue000\ue001\uf8ff end"),
    ("combining_marks", "e\u0301 a\u0300 n\u0303 Z\u0351\u0362\u0337a\u0338\u0321lgo"),
    ("chatml_lookalike", "<|im_start|>user\nhello<|im_end|>"),
    ("gemma_lookalike", "<bos>text<eos> and <pad>"),
    ("gemma_turn_lookalike", "<end_of_turn>\n<start_of_turn>user\nHi"),
    ("special_lookalikes", "</s> <s> <unk> <mask> [multimodal] <unused0>"),
    ("html_tags", "my<b>bold</b>text<i>it</i> and <table><tr><td>cell</td></tr></table>"),
    (
        "html",
        '<html><body><div class="x"><p>Hi &amp; bye</p>'
        '<a href="https://example.com">link</a></div></body></html>',
    ),
    ("urls", "Visit https://example.com/path?q=1&lang=en#frag or http://127.0.0.1:8080/api/v1."),
    ("mixed_scripts", "English, Ελληνικά, Русский, العربية, עברית, हिन्दी, ไทย, 中文 mixed!"),
    ("numbers", "Numbers: 0 00 000 0000 1,000,000 3.5e-10 -42 +7 ½ ² ٣ 一二三"),
    (
        "punctuation",
        "Wait... what?! (yes) [no] {maybe} \"quoted\" `code` ~tilde~ ^caret^ |pipe| $100 #hash @user",
    ),
    ("unicode_whitespace", "a\u00a0b\u2003c\u3000d\u200be\u2028f\u0085g"),
    ("control_chars", "bell\x07 null\x00 esc\x1b[0m del\x7f"),
    ("space_marker", "▁ underscores ▁▁ and _ lines"),
    ("symbols", "Math: ∑∫√∞ ≠ ≤ ≥ → ← ⇒ ∀x∈ℝ; currency: €£¥₹ ©®™"),
    ("fullwidth", "ｈａｌｆ ﾊﾝｶｸ ＦＵＬＬ　ＷＩＤＴＨ"),
    ("long_paragraph", LONG_PARAGRAPH),
]

# Chat prompts as (kind, text) segments; "template" text may hold control
# tokens, "text" is message content.
SPECIAL = {
    "smollm2-135m": [
        {
            "name": "chatml_system_user",
            "add_bos": False,
            "segments": [
                ["template", "<|im_start|>system\n"],
                ["text", "You are a helpful assistant."],
                ["template", "<|im_end|>\n<|im_start|>user\n"],
                ["text", "What's 3.14159 times 2?  Answer briefly."],
                ["template", "<|im_end|>\n<|im_start|>assistant\n"],
            ],
        },
        {
            "name": "chatml_with_assistant_turn",
            "add_bos": False,
            "segments": [
                ["template", "<|im_start|>user\n"],
                ["text", "Hi!"],
                ["template", "<|im_end|>\n<|im_start|>assistant\n"],
                ["text", "Hello, how can I help?"],
                ["template", "<|im_end|>\n"],
            ],
        },
    ],
    "gemma3-270m": [
        {
            "name": "gemma_turn",
            "add_bos": True,
            "segments": [
                ["template", "<start_of_turn>user\n"],
                ["text", "Write a haiku about the sea.\n\nKeep it   short."],
                ["template", "<end_of_turn>\n<start_of_turn>model\n"],
            ],
        },
        {
            "name": "gemma_turns_with_bos_in_template",
            "add_bos": False,
            "segments": [
                ["template", "<bos><start_of_turn>user\n"],
                ["text", "Hi <b>there</b>!"],
                ["template", "<end_of_turn>\n<start_of_turn>model\n"],
                ["text", "Hello!"],
                ["template", "<end_of_turn>\n"],
            ],
        },
    ],
}

MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct (byte-level BPE, pre = smollm)",
    "gemma3-270m": "Gemma-3-270M base (SentencePiece, byte fallback)",
}

FUZZ_PIECES = [
    " ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\r\n", "\r", " \n", "\n ", "\u00a0",
    "\u2003", "\u3000", "\u0085", "\u2028", "\x0b", "\x0c", "\x1c", "\x00",
    "a", "b", "the", "The", "THE", "hello", "world", "x", "I", "ll", "s", "re",
    "'", "'s", "'S", "'ll", "'LL", "'re", "'Ve", "'d", "'m", "'t", "''",
    "0", "1", "12", "123", "1234", "12345", "3.14", "1,000", "٣", "½", "²", "一",
    ".", ",", "!", "?", "...", "-", "_", "(", ")", "[", "]", "{", "}", "<", ">",
    "/", "\\", "|", "`", "~", "^", "$", "+", "=", "#", "@", "&", "*", "%", ";", ":",
    "\"", "—", "…", "«", "»", "。", "，", "、",
    "中", "中文", "日本語", "ひらがな", "カタカナ", "한국어", "Ελληνικά", "Русский",
    "العربية", "עברית", "हिन्दी", "ไทย", "é", "e\u0301", "\u0301", "\u0300\u0301",
    "👩‍👩‍👧‍👦", "👍🏽", "🇺🇸", "🏳️‍🌈", "😀", "\u200b", "\u200d", "\ufeff",
    "\ue000", "\U0010fffd", "\u0378", "\U00020000", "𪚥", "\u2581", "▁▁",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<bos>", "<eos>", "<pad>",
    "<start_of_turn>", "<end_of_turn>", "</s>", "<s>", "<unk>", "<mask>", "<b>", "</b>",
    "<table>", "<unused0>", "[multimodal]", "<reponame>", "<filename>", "<|im_",
    " " * 33, "\n" * 33, "\t" * 33, "\n" * 5 + " " * 3,
]


def random_text(rng: random.Random) -> str:
    n = rng.choice([1, 2, 3, 5, 8, 13, 21, 40])
    return "".join(rng.choice(FUZZ_PIECES) for _ in range(n))


def with_pre(model: Path, pre: str) -> Path:
    """A vocabulary-only copy of `model` with tokenizer.ggml.pre = `pre`."""
    import gguf

    reader = gguf.GGUFReader(str(model))
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    out = Path(tempfile.gettempdir()) / f"kiln-tokenizer-{model.parent.name}-{pre}.gguf"
    writer = gguf.GGUFWriter(str(out), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "tokenizer.ggml.pre":
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            if sub == gguf.GGUFValueType.STRING:
                value = [str(bytes(field.parts[i]), "utf-8") for i in field.data]
            else:
                value = [field.parts[i].tolist()[0] for i in field.data]
            writer.add_array(name, value)
        elif vtype == gguf.GGUFValueType.STRING:
            writer.add_string(name, str(bytes(field.parts[-1]), "utf-8"))
        else:
            writer.add_key_value(name, field.parts[-1].tolist()[0], vtype)
    writer.add_string("tokenizer.ggml.pre", pre)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def fuzz(args) -> int:
    model = args.model
    if args.pre is not None:
        model = with_pre(model, args.pre)
    llm = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
    rng = random.Random(args.seed)
    cases = []
    for _ in range(args.fuzz):
        text = random_text(rng)
        for special in (False, True):
            ids = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)
            cases.append({"text": text, "add_bos": add_bos, "special": special, "ids": ids})
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"model_file": str(model), "cases": cases}, f, ensure_ascii=False)
    print(f"wrote {args.out}: {len(cases)} cases for {model}")
    return 0


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main() -> int:
    home = Path(os.environ.get("KILN_TEST_HOME", Path.home() / ".cache" / "kiln" / "home"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=home / "models")
    parser.add_argument("--fuzz", type=int, help="write N random cases instead")
    parser.add_argument("--model", type=Path, help="GGUF file for --fuzz")
    parser.add_argument("--pre", help="replace tokenizer.ggml.pre (--fuzz)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="output file for --fuzz")
    args = parser.parse_args()
    if args.fuzz is not None:
        if args.model is None or args.out is None:
            parser.error("--fuzz needs --model and --out")
        return fuzz(args)

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name, description in MODELS.items():
        path = args.models_dir / name / "model.gguf"
        if not path.exists():
            sys.stderr.write(f"{path} is missing: run `kiln pull {name}`\n")
            return 1
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))

        texts = [
            {
                "name": text_name,
                "text": text,
                "add_bos": add_bos,
                "ids": llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False),
            }
            for text_name, text in TEXTS
        ]
        special = []
        for case in SPECIAL[name]:
            joined = "".join(text for _, text in case["segments"])
            special.append(
                {
                    "name": case["name"],
                    "segments": [{"kind": k, "text": t} for k, t in case["segments"]],
                    "add_bos": case["add_bos"],
                    "ids": llm.tokenize(
                        joined.encode("utf-8"), add_bos=case["add_bos"], special=True
                    ),
                }
            )
        eog = [i for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)]

        fixture = {
            "description": (
                f"llama.cpp token ids for {description}. Written by "
                "scripts/make_tokenizer_fixtures.py; do not edit by hand."
            ),
            "command": COMMAND,
            "llama_cpp_python_version": llama_cpp.__version__,
            "model": {
                "name": name,
                "file": f"models/{name}/model.gguf",
                "sha256": sha256(path),
                "n_vocab": llm.n_vocab(),
                "add_bos": add_bos,
                "bos": llama_cpp.llama_vocab_bos(vocab),
                "eos": llama_cpp.llama_vocab_eos(vocab),
                "eog": eog,
            },
            "texts": texts,
            "special": special,
        }
        out = OUT_DIR / f"{name}.json"
        with open(out, "w", encoding="utf-8") as f:
            json.dump(fixture, f, ensure_ascii=False, indent=1)
            f.write("\n")
        print(f"wrote {out.relative_to(REPO)}: {len(texts)} texts, {len(special)} chat prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
