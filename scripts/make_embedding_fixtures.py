#!/usr/bin/env python3
"""Writes tests/fixtures/embeddings/all-minilm-l6-v2.json: reference token ids
and sentence embeddings for all-MiniLM-L6-v2, computed by the reference
implementation (the `sentence-transformers` package on torch, CPU, float32).

kiln-engine's tests/embeddings_reference.rs checks Kiln's own WordPiece
tokenizer and BERT forward pass against this file.

Usage (from the repository root; needs `pip install sentence-transformers`):

    python3 scripts/make_embedding_fixtures.py [--model-dir DIR]

DIR defaults to $KILN_TEST_HOME/models/all-minilm-l6-v2 (KILN_TEST_HOME
defaults to ~/.cache/kiln/home), where `kiln pull all-minilm-l6-v2` puts it.
"""

import argparse
import hashlib
import json
import os
import platform
import shlex
import sys
from pathlib import Path

# A fixed set covering what the tokenizer and the encoder must get right.
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you doing today?",
    "A café with naïve décor in Zürich, São Paulo and Ångström Straße.",
    "In 2024, revenue grew 12.5% to $3,400,000 (approx. 3.4e6) on 2024-07-01.",
    "我喜欢自然语言处理。今天天气很好！",
    " ",
    "",
    "Kiln runs models privately \u2014 no data leaves the box\u2026 \u201cright?\u201d",
    "unbelievably antidisestablishmentarianism supercalifragilisticexpialidocious",
    "Special tokens like [SEP] and [MASK] typed as text, but not [sep].",
    "tabs\tand\nnewlines\u00a0and zero\u200bwidth and NUL\u0000 characters",
    "Emoji \U0001F642 and \u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac, "
    "\u0440\u0443\u0441\u0441\u043a\u0438\u0439 \u0442\u0435\u043a\u0441\u0442, "
    "\u3053\u3093\u306b\u3061\u306f and \ud55c\uad6d\uc5b4.",
    "A word too long for WordPiece: " + "x" * 101 + " ends here.",
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "THE MODEL LOWERCASES EVERYTHING, EVEN İSTANBUL AND ÉCOLE.",
]

# Grown one clause at a time until it is just under the 256-token limit.
LONG_CLAUSES = [
    "Sentence embeddings map a piece of text to a fixed-size vector",
    "so that texts with similar meaning end up close together",
    "which makes them useful for semantic search, clustering and deduplication",
    "the model reads at most two hundred and fifty-six word pieces",
    "including the classification token at the start and the separator at the end",
    "every token attends to every other token through six layers of self-attention",
    "after which the token vectors are averaged over the attention mask",
    "and the average is scaled to unit length so cosine similarity is a dot product",
]


def long_sentence(tokenizer, limit):
    words = []
    i = 0
    while True:
        clause = LONG_CLAUSES[i % len(LONG_CLAUSES)] + ("." if i % 2 else ",")
        candidate = " ".join(words + [clause])
        if len(tokenizer(candidate)["input_ids"]) > limit - 4:
            break
        words.append(clause)
        i += 1
    # Top up with one-token words to land exactly on the limit.
    filler = ["and", "more", "words"]
    while len(tokenizer(" ".join(words))["input_ids"]) < limit:
        words.append(filler[len(words) % len(filler)])
    text = " ".join(words)
    if len(tokenizer(text)["input_ids"]) != limit:
        sys.exit(f"could not build a sentence of exactly {limit} tokens")
    return text


# Character pools for generated tokenizer cases: every class the BERT
# normalizer and pre-tokenizer treat specially, plus unassigned code points.
CHAR_RANGES = [
    (0x20, 0x7E),  # ASCII
    (0x00, 0x1F),  # C0 controls (tab, newline, CR are whitespace)
    (0x7F, 0x9F),  # DEL and C1 controls
    (0xA0, 0x24F),  # Latin-1 and Latin Extended, NBSP, soft hyphen
    (0x300, 0x36F),  # combining marks
    (0x370, 0x52F),  # Greek (with unassigned points), Cyrillic
    (0x590, 0x6FF),  # Hebrew, Arabic
    (0x900, 0x97F),  # Devanagari
    (0xE00, 0xE7F),  # Thai
    (0x1100, 0x11FF),  # Hangul Jamo
    (0x1E00, 0x1EFF),  # Latin Extended Additional
    (0x2000, 0x206F),  # general punctuation, spaces, zero-width and format chars
    (0x2100, 0x218F),  # letterlike symbols (Kelvin sign, ...)
    (0x3000, 0x30FF),  # CJK punctuation, ideographic space, Hiragana, Katakana
    (0x3400, 0x4DBF),  # CJK Extension A
    (0x4E00, 0x9FFF),  # CJK Unified Ideographs
    (0xAC00, 0xD7A3),  # Hangul syllables
    (0xE000, 0xE0FF),  # private use
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFB00, 0xFB4F),  # ligatures (ﬁ) and presentation forms
    (0xFE00, 0xFE6F),  # variation selectors, small forms
    (0xFF00, 0xFFEF),  # full-width forms
    (0xFFF0, 0xFFFF),  # specials, U+FFFD
    (0x1D400, 0x1D7FF),  # mathematical alphanumerics
    (0x1F300, 0x1FAFF),  # emoji
    (0x20000, 0x2A6DF),  # CJK Extension B
    (0xE0000, 0xE007F),  # tag characters (format)
]
FRAGMENTS = ["[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]", "[sep]", "[CLS", "##", "  ", "\r\n", "x" * 101]


def generated_texts(tokenizer, count):
    """Deterministic random texts mixing vocabulary words and odd characters."""
    import random

    rng = random.Random(20240601)
    vocab = sorted(tokenizer.get_vocab())
    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(1, 12)):
            roll = rng.random()
            if roll < 0.4:
                word = rng.choice(vocab).removeprefix("##")
                parts.append(word.upper() if rng.random() < 0.2 else word)
            elif roll < 0.9:
                lo, hi = rng.choice(CHAR_RANGES)
                parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 6))))
            else:
                parts.append(rng.choice(FRAGMENTS))
            parts.append(rng.choice(["", " ", " ", "\t", "\u3000"]))
        texts.append("".join(parts))
    return texts


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main():
    home = Path(os.environ.get("KILN_TEST_HOME", Path.home() / ".cache/kiln/home"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=home / "models/all-minilm-l6-v2")
    fixtures = Path(__file__).resolve().parent.parent / "tests/fixtures/embeddings"
    parser.add_argument("--out", type=Path, default=fixtures / "all-minilm-l6-v2.json")
    parser.add_argument(
        "--tokenizer-out", type=Path, default=fixtures / "all-minilm-l6-v2-tokenizer.json"
    )
    parser.add_argument("--generated", type=int, default=2000, help="generated tokenizer cases")
    args = parser.parse_args()

    import numpy as np
    import sentence_transformers
    import tokenizers
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    model = SentenceTransformer(str(args.model_dir), device="cpu")
    model.eval()
    tokenizer = model.tokenizer
    limit = model.max_seq_length

    sentences = SENTENCES + [long_sentence(tokenizer, limit)]
    cases = []
    for text in sentences:
        ids = tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"]
        if len(ids) > limit:
            sys.exit(f"fixture sentence has {len(ids)} tokens, over the {limit} limit: {text!r}")
        # What sentence-transformers feeds the encoder must be these ids.
        preprocess = getattr(model, "preprocess", None) or model.tokenize
        st_ids = preprocess([text])["input_ids"][0].tolist()
        if st_ids != ids:
            sys.exit(f"sentence-transformers tokenized {text!r} differently: {st_ids} vs {ids}")
        # One at a time: the reference has no padding at all.
        with torch.no_grad():
            vector = model.encode([text], batch_size=1, convert_to_numpy=True)[0]
        norm = float(np.linalg.norm(vector))
        if abs(norm - 1.0) > 1e-5:
            sys.exit(f"embedding of {text!r} is not normalised (norm {norm})")
        cases.append(
            {
                "text": text,
                "token_ids": ids,
                "embedding": [float(x) for x in vector.astype(np.float32)],
            }
        )

    generator = {
        "command": "python3 scripts/make_embedding_fixtures.py"
        + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:]),
        "install": f"pip install sentence-transformers=={sentence_transformers.__version__}"
        " (torch from PyPI, CPU run)",
        "python": platform.python_version(),
        "sentence_transformers": sentence_transformers.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    fixture = {
        "model": "all-minilm-l6-v2",
        "model_safetensors_sha256": sha256(args.model_dir / "model.safetensors"),
        "max_seq_length": limit,
        "dimensions": (
            getattr(model, "get_embedding_dimension", None)
            or model.get_sentence_embedding_dimension
        )(),
        "reference": "sentence-transformers SentenceTransformer.encode, CPU, float32, batch_size=1",
        "generator": generator,
        "sentences": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {len(cases)} sentences to {args.out}")

    # Tokenizer-only cases: random text through the same HF tokenizer.
    tokenizer_cases = [
        {"text": text, "token_ids": tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"]}
        for text in generated_texts(tokenizer, args.generated)
    ]
    with open(args.tokenizer_out, "w", encoding="utf-8") as f:
        json.dump(
            {
                "model": "all-minilm-l6-v2",
                "reference": "the sentence-transformers model's HF tokenizer, no truncation",
                "generator": generator,
                "cases": tokenizer_cases,
            },
            f,
            ensure_ascii=True,
            separators=(",", ":"),
        )
        f.write("\n")
    print(f"wrote {len(tokenizer_cases)} tokenizer cases to {args.tokenizer_out}")


if __name__ == "__main__":
    main()
