#!/usr/bin/env python3
"""Writes tests/fixtures/generation/*.json: golden greedy continuations from
llama.cpp (through llama-cpp-python's low-level API), used to check Kiln's own
transformer forward pass token for token and logit for logit.

One file per model:
  smollm2-135m.json   SmolLM2-135M-Instruct Q4_1 (llama architecture)
  gemma3-270m.json    Gemma-3-270M base Q4_K_M (gemma3; one prompt runs past
                      the 512-token sliding window)
  tiny-qwen2.json     a tiny random-weight qwen2 GGUF (q/k/v biases)
  tiny-qwen3.json     a tiny random-weight qwen3 GGUF (q/k norms, head_dim 32)

The tiny files are written by Kiln's own deterministic writer
(crates/kiln-engine/tests/common/tiny_gguf.rs, through
`cargo run -p kiln-engine --example write_tiny_gguf -- ARCH PATH`), so Rust
tests can write byte-identical files themselves; the fixture records their
sha256 to prove it. For them the script also runs an independent float64
numpy forward pass (teacher-forced on llama.cpp's tokens) and stores its top 10
per step as `f64_top`: a tight reference for an f32 implementation. llama.cpp's
defaults (f16 KV cache, flash attention) put its logits up to ~0.04 away from
float64 on these files; with an f32 KV cache and flash attention off it agrees
to ~1e-5, which checks that llama.cpp reads the tiny files as intended.

For every prompt: tokenize with llama.cpp (the model's own add-BOS default,
special tokens parsed), evaluate the whole prompt in one llama_decode call,
then decode greedily one token per llama_decode call for N steps. EOS/EOG is
not special: the argmax is fed back whatever it is. At every step the file
keeps the chosen id, the top 10 (id, raw logit) pairs and the gap between the
two largest logits (small gaps are where a correct implementation may
legitimately pick the other token). Each prompt is run twice: `steps` with
the prompt in one llama_decode call (llama.cpp's default), and
`token_by_token_steps` with the prompt fed one token per call, where llama.cpp
uses its single-row kernels for every position. The two differ by llama.cpp's
own summation order alone; Kiln's batch-invariant kernels follow the second.

Usage (from the repository root; needs `pip install llama-cpp-python`, and
cargo for the tiny models):

    python3 scripts/make_generation_fixtures.py [--models-dir DIR] [--only NAME ...]

DIR defaults to $KILN_TEST_HOME/models (KILN_TEST_HOME defaults to
~/.cache/kiln/home), where `kiln pull smollm2-135m` / `kiln pull gemma3-270m`
put the models. Re-running regenerates the same files (llama.cpp on CPU with a
fixed thread count is deterministic on one machine; another CPU may differ in
the last bits of the logits).
"""

import argparse
import ctypes
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import llama_cpp as L

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "tests" / "fixtures" / "generation"

N_THREADS = 2
N_CTX = 2048
N_BATCH = 1024  # also n_ubatch: every prompt goes through in a single ubatch
TOP_K = 10
STEPS_REAL = 64
STEPS_TINY = 32

# ---------------------------------------------------------------------------
# Prompts. Raw text, no chat template (except one prompt per model that spells
# ChatML / Gemma turn markers out by hand, to cover special-token parsing).
# ---------------------------------------------------------------------------

COMMON_PROMPTS = [
    ("story", "Once upon a time, in a small village at the edge of a dark forest, there lived"),
    ("fact", "The Eiffel Tower is located in Paris, France. It was completed in the year"),
    (
        "code",
        "def fibonacci(n):\n"
        '    """Return the n-th Fibonacci number."""\n'
        "    if n < 2:\n"
        "        return n\n",
    ),
    ("list", "Ingredients for a simple pancake recipe:\n1. Flour\n2. Milk\n3."),
    ("question", "Question: Why is the sky blue?\nAnswer:"),
    (
        "unicode",
        "Café au lait, naïve résumé — 東京 is the capital of Japan; Zürich has 1.4 million people. In summary,",
    ),
]

SMOLLM2_EXTRA = [
    (
        "chatml",
        "<|im_start|>user\nWhat is the capital of Italy?<|im_end|>\n<|im_start|>assistant\n",
    ),
]

# A long passage of varied prose for Gemma: the prompt must be longer than the
# 512-token sliding window so that decoding exercises the windowed layers.
LONG_PASSAGE = """\
The harbour town of Wrenmouth had never been famous for anything except its fog. \
Every morning it rolled in from the grey water, swallowed the lighthouse, the fish market \
and the narrow streets that climbed the hill, and every afternoon it slipped back out to sea \
as if it had only come to count the boats. The townspeople measured their lives by it. \
Children were told to be home "before the fog lifts", old sailors claimed they could smell \
a storm inside it, and the baker, a tall woman named Ottilie Marsh, swore that her bread \
rose better on the foggiest days.

In the spring of 1887 a stranger arrived on the weekly steamer. He carried a leather case, \
a folding tripod and a notebook bound in green cloth, and he asked the harbour master for \
a room with a window facing west. His name, he said, was Doctor Elias Penhallow, and he had \
come to study the weather. Nobody in Wrenmouth had ever heard of a man studying weather; \
weather was something that happened to you, like a cold or a bad harvest. Still, the \
harbour master's sister kept a boarding house, rooms were cheap in April, and the doctor \
paid for six weeks in advance, in silver.

He was an odd lodger. He rose at four, before the fishermen, and climbed to the top of the \
chapel tower with his instruments. He wrote down numbers every quarter of an hour: the \
temperature of the air, the temperature of the water, the height of the tide, the direction \
of the wind, and something he called "the dew point", which nobody understood. In the \
evenings he sat in the kitchen and asked questions. How thick was the fog last winter? Did \
it ever come in the afternoon? Had anyone seen it move against the wind? Most people \
answered politely and then went home to laugh about him, but Ottilie Marsh listened.

"You think it follows rules," she said one night, watching him copy his figures into neat \
columns. "Like a recipe."

"Everything follows rules," said Penhallow. "The trick is that the fog has more ingredients \
than your bread, and it does not tell you what they are. Warm, wet air from the south passes \
over cold water; the air cools until it cannot hold its water any longer; the water comes \
out as tiny drops, too small to fall. That is all fog is. A cloud that has lost its way."

"Then why does it leave every afternoon?"

"Because the sun warms the land, the land warms the air, and warm air can hold the water \
again. The drops evaporate. If I am right, I can tell you tomorrow morning at what hour the \
fog will lift, within ten minutes, from three numbers taken at dawn."

Ottilie laughed, but she made him a wager: a loaf of her best rye against one of his silver \
coins. For eleven days the doctor wrote his prediction on a slip of paper and pinned it to \
the bakery door at six o'clock, and for eleven days half the town gathered in the street in \
the afternoon to watch the fog go. He was right nine times. Twice he was wrong by nearly an \
hour, and on both of those days a wind had come up from the east before noon, which, he \
admitted, his three numbers knew nothing about.

By the end of May the fishermen were asking him whether to go out. By June the harbour \
master had bought a thermometer of his own. When Penhallow finally left on the steamer, he \
took his tripod and his instruments but left the green notebook with Ottilie, who kept it on \
the shelf above her ovens for the rest of her life. On the first page he had written a \
single sentence: "A rule is only a story that keeps coming true."

Years later, when the town built a proper weather station on the cliff, the young man sent \
to run it found the notebook in the bakery and asked whether he might borrow it. Ottilie, by \
then very old, shook her head. She said that the fog would be along in the morning, as it \
always was, and that he could watch it for himself, and that when he had done so for forty \
years he might come back and tell her what he had learned. Then she wrapped a loaf of rye in \
paper, pressed it into his hands, and sent him up the hill."""

GEMMA_EXTRA = [
    (
        "gemma_turns",
        "<start_of_turn>user\nName three primary colors.<end_of_turn>\n<start_of_turn>model\n",
    ),
    ("long_passage", LONG_PASSAGE + "\n\nQuestion: What did Penhallow leave with Ottilie?\nAnswer:"),
]

# Tiny random models: prompts as token ids (byte tokens are ids 0..255 by byte
# value; see tiny_gguf.rs), plus text prompts that llama.cpp tokenizes with the
# tiny vocabulary (byte-level BPE, qwen2 pre-tokenizer, a few merges).
TINY_PROMPTS = [
    ("ids_short", None, [72, 101, 108, 108, 111]),
    ("ids_single", None, [10]),
    ("ids_mixed", None, [264, 84, 104, 101, 32, 99, 97, 116, 256, 257, 258, 46, 266, 10]),
    ("ids_long", None, [(i * 37 + 11) % 267 for i in range(96)]),
    ("text_merges", "the cat sat in the sun, then the end.", None),
    ("text_chatml", "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n", None),
]

MODELS = {
    "smollm2-135m": {
        "kind": "real",
        "file": "smollm2-135m/model.gguf",
        "description": "SmolLM2-135M-Instruct, GGUF Q4_1 (llama architecture)",
        "prompts": COMMON_PROMPTS + SMOLLM2_EXTRA,
        "steps": STEPS_REAL,
    },
    "gemma3-270m": {
        "kind": "real",
        "file": "gemma3-270m/model.gguf",
        "description": "Gemma-3-270M (base), GGUF Q4_K_M (gemma3 architecture, sliding window 512)",
        "prompts": COMMON_PROMPTS + GEMMA_EXTRA,
        "steps": STEPS_REAL,
        "min_long_prompt_tokens": 600,
    },
    "tiny-qwen2": {
        "kind": "tiny",
        "arch": "qwen2",
        "description": "tiny random-weight qwen2 GGUF written by tests/common/tiny_gguf.rs",
        "steps": STEPS_TINY,
    },
    "tiny-qwen3": {
        "kind": "tiny",
        "arch": "qwen3",
        "description": "tiny random-weight qwen3 GGUF written by tests/common/tiny_gguf.rs",
        "steps": STEPS_TINY,
    },
}

# ---------------------------------------------------------------------------
# llama.cpp plumbing
# ---------------------------------------------------------------------------

_LOG_LINES: list[str] = []


@L.llama_log_callback
def _log_callback(level, text, user_data):  # noqa: ARG001 (ctypes signature)
    _LOG_LINES.append(text.decode("utf-8", errors="replace"))


def _log_text() -> str:
    return "".join(_LOG_LINES)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def f32(x) -> float:
    """A float32 as the shortest decimal that reads back to the same float32."""
    return float(f"{float(np.float32(x)):.9g}")


class Reference:
    """One GGUF model loaded in llama.cpp; a fresh context per prompt."""

    def __init__(self, path: Path, n_ctx: int):
        self.path = path
        self.n_ctx = n_ctx
        mparams = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}:\n{_log_text()[-4000:]}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.add_bos = bool(L.llama_vocab_get_add_bos(self.vocab))
        self.eog = sorted(t for t in range(self.n_vocab) if L.llama_vocab_is_eog(self.vocab, t))

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = L.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else None

    def context_params(self):
        p = L.llama_context_default_params()
        p.n_ctx = self.n_ctx
        p.n_batch = N_BATCH
        p.n_ubatch = N_BATCH
        p.n_threads = N_THREADS
        p.n_threads_batch = N_THREADS
        # Flash attention off, as llama-cpp-python's `Llama` class sets it by
        # default: the plain attention path (f16 K/V cache, f16-rounded query
        # and softmax weights, f32 accumulation) is the one Kiln's forward pass
        # mirrors. type_k / type_v / swa_full stay at the library defaults;
        # settings() records what they are and what they resolved to.
        p.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        return p

    def settings(self) -> dict:
        p = self.context_params()
        _LOG_LINES.clear()
        ctx = L.llama_init_from_model(self.model, p)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context:\n{_log_text()[-4000:]}")
        log = _log_text()
        L.llama_free(ctx)
        if "Flash Attention enabled" in log:
            fa_resolved = "enabled"
        elif "Flash Attention was auto, set to disabled" in log or "flash_attn            = disabled" in log:
            fa_resolved = "disabled"
        else:
            fa_resolved = "unknown"
        fa_names = {
            L.LLAMA_FLASH_ATTN_TYPE_AUTO: "auto",
            L.LLAMA_FLASH_ATTN_TYPE_DISABLED: "disabled",
            L.LLAMA_FLASH_ATTN_TYPE_ENABLED: "enabled",
        }
        ggml_types = {0: "f32", 1: "f16", 8: "q8_0", 30: "bf16"}
        return {
            "n_threads": p.n_threads,
            "n_threads_batch": p.n_threads_batch,
            "n_ctx": p.n_ctx,
            "n_batch": p.n_batch,
            "n_ubatch": p.n_ubatch,
            "kv_cache_type_k": ggml_types.get(p.type_k, str(p.type_k)),
            "kv_cache_type_v": ggml_types.get(p.type_v, str(p.type_v)),
            "flash_attn_requested": fa_names.get(p.flash_attn_type, str(p.flash_attn_type)),
            "flash_attn_resolved": fa_resolved,
            "swa_full": bool(p.swa_full),
            "n_gpu_layers": 0,
            "backend": "CPU",
            "add_bos": self.add_bos,
            "parse_special": True,
            "top_k_recorded": TOP_K,
            "sampling": "greedy: argmax of the raw logits (ties go to the lowest id); "
            "EOS/EOG tokens are fed back like any other token",
            "prompt_eval": "the whole prompt in one llama_decode call (one ubatch), logits of the last position only",
            "decode": "one token per llama_decode call",
            "token_by_token_steps": "the same greedy run with the prompt evaluated one token per "
            "llama_decode call: llama.cpp's single-row arithmetic everywhere (its batched prompt "
            "kernels sum in a different order, which moves its own logits by up to ~1.5 on the "
            "real models; see scripts/dev/llamacpp_self_consistency.py)",
        }

    def tokenize(self, text: str) -> list[int]:
        raw = text.encode("utf-8")
        cap = len(raw) + 16
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(self.vocab, raw, len(raw), buf, cap, self.add_bos, True)
        if n < 0:
            raise RuntimeError(f"tokenize failed ({n}) for {text[:40]!r}")
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        if n < 0:
            raise RuntimeError(f"token_to_piece failed for {token}")
        return buf.raw[:n]

    def _decode(self, ctx, tokens: list[int]) -> np.ndarray:
        arr = (L.llama_token * len(tokens))(*tokens)
        batch = L.llama_batch_get_one(arr, len(tokens))
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}:\n{_log_text()[-2000:]}")
        ptr = L.llama_get_logits_ith(ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float32, copy=True)

    def greedy(self, prompt_tokens: list[int], steps: int, token_by_token: bool = False) -> list[dict]:
        """Greedy steps after the prompt, evaluated in one llama_decode call
        or, with `token_by_token`, one call per prompt token (llama.cpp then
        runs its one-row kernels throughout, as in decode)."""
        if len(prompt_tokens) > N_BATCH:
            raise RuntimeError(f"prompt of {len(prompt_tokens)} tokens exceeds n_batch {N_BATCH}")
        if len(prompt_tokens) + steps > self.n_ctx:
            raise RuntimeError("prompt + steps exceed n_ctx")
        ctx = L.llama_init_from_model(self.model, self.context_params())
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context:\n{_log_text()[-4000:]}")
        try:
            if token_by_token:
                for t in prompt_tokens:
                    logits = self._decode(ctx, [t])
            else:
                logits = self._decode(ctx, prompt_tokens)
            out = []
            for _ in range(steps):
                # Sort by (-logit, id): deterministic order among equal logits.
                order = np.lexsort((np.arange(self.n_vocab), -logits))[:TOP_K]
                top = [[int(i), f32(logits[i])] for i in order]
                chosen = int(order[0])
                out.append(
                    {
                        "token": chosen,
                        "top": top,
                        "gap": f32(np.float32(logits[order[0]]) - np.float32(logits[order[1]])),
                    }
                )
                logits = self._decode(ctx, [chosen])
            return out
        finally:
            L.llama_free(ctx)

    def close(self):
        L.llama_model_free(self.model)


# ---------------------------------------------------------------------------
# Fixture assembly
# ---------------------------------------------------------------------------


def build_info() -> dict:
    return {
        "llama_cpp_python_version": L.__version__,
        "llama_cpp_version": L.llama_version().decode(),
        "llama_cpp_system_info": L.llama_print_system_info().decode().strip(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "system": platform.system(),
    }


def served_text(ref: Reference, steps: list[dict]) -> dict:
    """What a server answering `/v1/completions` greedily with the token-by-
    token continuation returns: the text up to (not including) the first
    end-of-generation token and the OpenAI finish reason."""
    tokens = [s["token"] for s in steps]
    eog = next((i for i, t in enumerate(tokens) if t in set(ref.eog)), None)
    kept = tokens if eog is None else tokens[:eog]
    return {
        "token_by_token_completion": {
            "text": b"".join(ref.piece(t) for t in kept).decode("utf-8", errors="replace"),
            "completion_tokens": len(tokens) if eog is None else eog + 1,
            "finish_reason": "length" if eog is None else "stop",
        }
    }


def run_prompts(ref: Reference, prompts, steps: int) -> list[dict]:
    cases = []
    for name, text, ids in prompts:
        tokens = list(ids) if ids is not None else ref.tokenize(text)
        t_steps = ref.greedy(tokens, steps)
        tbt_steps = ref.greedy(tokens, steps, token_by_token=True)
        generated = [s["token"] for s in t_steps]
        gaps = [s["gap"] for s in t_steps]
        cases.append(
            {
                "name": name,
                "text": text,
                "prompt_tokens": tokens,
                "n_prompt_tokens": len(tokens),
                "generated_tokens": generated,
                "generated_text": b"".join(ref.piece(t) for t in generated).decode("utf-8", errors="replace"),
                **served_text(ref, tbt_steps),
                "min_gap": min(gaps),
                "min_gap_step": gaps.index(min(gaps)),
                "steps": t_steps,
                "token_by_token_steps": tbt_steps,
            }
        )
        print(
            f"  {name}: {len(tokens)} prompt tokens, min gap {min(gaps):.4f} at step "
            f"{gaps.index(min(gaps))}: {cases[-1]['generated_text'][:70]!r}",
            file=sys.stderr,
        )
    return cases


def numpy_forward(path: Path, tokens: list[int]) -> np.ndarray:
    """Logits at every position of `tokens` for a tiny qwen2/qwen3 GGUF, in
    float64 numpy straight from the Qwen definitions (NeoX-style rope, GQA,
    SwiGLU). An independent check that llama.cpp reads the tiny files as
    intended; not used for the fixture values themselves."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    arch = r.fields["general.architecture"].contents()
    meta = {k: f.contents() for k, f in r.fields.items() if k.startswith(arch + ".")}
    w = {t.name: np.asarray(t.data, dtype=np.float64).reshape(list(reversed(t.shape.tolist()))) for t in r.tensors}
    hidden = meta[f"{arch}.embedding_length"]
    n_head = meta[f"{arch}.attention.head_count"]
    n_kv = meta[f"{arch}.attention.head_count_kv"]
    hd = meta.get(f"{arch}.attention.key_length", hidden // n_head)
    eps = meta[f"{arch}.attention.layer_norm_rms_epsilon"]
    base = meta[f"{arch}.rope.freq_base"]

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    n = len(tokens)
    pos = np.arange(n)[:, None]
    inv = base ** (-np.arange(0, hd, 2) / hd)
    cos, sin = np.cos(pos * inv), np.sin(pos * inv)

    def rope(x):  # x: [n, heads, hd]
        a, b = x[..., : hd // 2], x[..., hd // 2 :]
        c, s = cos[:, None, :], sin[:, None, :]
        return np.concatenate([a * c - b * s, b * c + a * s], -1)

    mask = np.triu(np.full((n, n), -np.inf), 1)
    x = w["token_embd.weight"][tokens]
    for layer in range(meta[f"{arch}.block_count"]):
        g = lambda s: w[f"blk.{layer}.{s}"]  # noqa: E731
        h = rms(x, g("attn_norm.weight"))
        q = h @ g("attn_q.weight").T
        k = h @ g("attn_k.weight").T
        v = h @ g("attn_v.weight").T
        if arch == "qwen2":
            q, k, v = q + g("attn_q.bias"), k + g("attn_k.bias"), v + g("attn_v.bias")
        q, k, v = q.reshape(n, n_head, hd), k.reshape(n, n_kv, hd), v.reshape(n, n_kv, hd)
        if arch == "qwen3":
            q, k = rms(q, g("attn_q_norm.weight")), rms(k, g("attn_k_norm.weight"))
        q, k = rope(q), rope(k)
        rep = n_head // n_kv
        out = np.empty((n, n_head, hd))
        for head in range(n_head):
            scores = q[:, head] @ k[:, head // rep].T / np.sqrt(hd) + mask
            p = np.exp(scores - scores.max(-1, keepdims=True))
            out[:, head] = (p / p.sum(-1, keepdims=True)) @ v[:, head // rep]
        x = x + out.reshape(n, n_head * hd) @ g("attn_output.weight").T
        h = rms(x, g("ffn_norm.weight"))
        gate = h @ g("ffn_gate.weight").T
        x = x + ((gate / (1 + np.exp(-gate))) * (h @ g("ffn_up.weight").T)) @ g("ffn_down.weight").T
    return rms(x, w["output_norm.weight"]) @ w["output.weight"].T


def numpy_check(path: Path, cases: list[dict]) -> dict:
    """Teacher-forced along llama.cpp's continuation (prompt + llama.cpp's
    tokens): adds each step's float64 top 10 as `f64_top`, and reports the
    largest difference from llama.cpp's recorded top-10 logits and the steps
    where the float64 argmax differs from llama.cpp's token."""
    worst, disagree = 0.0, []
    for c in cases:
        toks = c["prompt_tokens"] + c["generated_tokens"][:-1]
        logits = numpy_forward(path, toks)[len(c["prompt_tokens"]) - 1 :]
        for i, step in enumerate(c["steps"]):
            for tid, val in step["top"]:
                worst = max(worst, abs(logits[i, tid] - val))
            order = np.lexsort((np.arange(logits.shape[1]), -logits[i]))[:TOP_K]
            step["f64_top"] = [[int(t), f32(logits[i, t])] for t in order]
            if int(order[0]) != step["token"]:
                disagree.append({"prompt": c["name"], "step": i, "gap": step["gap"]})
    return {
        "reference": "float64 numpy forward from the Qwen definitions (numpy_forward in "
        "scripts/make_generation_fixtures.py), teacher-forced on llama.cpp's tokens; "
        "per step in f64_top (rounded to f32)",
        "max_abs_logit_diff_top10": round(float(worst), 6),
        "argmax_disagreements": disagree,
    }


def write_tiny(arch: str, path: Path) -> list[str]:
    cmd = [
        "cargo",
        "run",
        "--quiet",
        "-p",
        "kiln-engine",
        "--example",
        "write_tiny_gguf",
        "--",
        arch,
        str(path),
    ]
    subprocess.run(cmd, cwd=REPO, check=True)
    return cmd


def make_fixture(name: str, spec: dict, models_dir: Path, command: str) -> dict:
    print(f"{name}:", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        if spec["kind"] == "real":
            path = models_dir / spec["file"]
            if not path.exists():
                raise SystemExit(f"missing {path}: run `kiln pull {name}` (or pass --models-dir)")
            prompts = [(n, t, None) for n, t in spec["prompts"]]
            n_ctx = N_CTX
            model_info = {"file": f"models/{spec['file']}"}
        else:
            path = Path(tmp) / f"{name}.gguf"
            cmd = write_tiny(spec["arch"], path)
            prompts = TINY_PROMPTS
            n_ctx = 512
            model_info = {
                "writer": "crates/kiln-engine/tests/common/tiny_gguf.rs (write_tiny_model)",
                "writer_command": " ".join(shlex.quote(c) for c in cmd[:-1]) + " PATH",
                "arch": spec["arch"],
            }
        model_info["sha256"] = sha256_file(path)
        model_info["size_bytes"] = path.stat().st_size

        ref = Reference(path, n_ctx)
        try:
            model_info["architecture"] = ref.meta("general.architecture")
            model_info["n_vocab"] = ref.n_vocab
            model_info["eog_tokens"] = ref.eog
            settings = ref.settings()
            settings["steps"] = spec["steps"]
            cases = run_prompts(ref, prompts, spec["steps"])
        finally:
            ref.close()
        if spec["kind"] == "tiny":
            model_info["numpy_check"] = numpy_check(path, cases)
            print(f"  numpy check: {model_info['numpy_check']}", file=sys.stderr)

    if "min_long_prompt_tokens" in spec:
        longest = max(c["n_prompt_tokens"] for c in cases)
        if longest <= spec["min_long_prompt_tokens"]:
            raise SystemExit(f"{name}: longest prompt has {longest} tokens, need > {spec['min_long_prompt_tokens']}")

    gaps = [(s["gap"], c["name"], i) for c in cases for i, s in enumerate(c["steps"])]
    small = [{"prompt": n, "step": i, "gap": g} for g, n, i in sorted(gaps) if g < 0.01]
    return {
        "description": f"Greedy continuations from llama.cpp for {spec['description']}. "
        "Written by scripts/make_generation_fixtures.py; do not edit by hand.",
        "command": command,
        "generator": build_info(),
        "model": model_info,
        "settings": settings,
        "min_gap": min(g for g, _, _ in gaps),
        "small_gaps": small,
        "prompts": cases,
    }


def to_json(fixture: dict) -> str:
    """Indented JSON, except that token lists and each step sit on one line."""
    compact = {}

    def stash(value) -> str:
        key = f"@@compact{len(compact)}@@"
        compact[key] = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        return key

    shaped = dict(fixture)
    shaped["prompts"] = [
        {
            **c,
            "prompt_tokens": stash(c["prompt_tokens"]),
            "generated_tokens": stash(c["generated_tokens"]),
            "steps": [stash(s) for s in c["steps"]],
            "token_by_token_steps": [stash(s) for s in c["token_by_token_steps"]],
        }
        for c in fixture["prompts"]
    ]
    shaped["model"] = {**fixture["model"], "eog_tokens": stash(fixture["model"]["eog_tokens"])}
    text = json.dumps(shaped, indent=1, ensure_ascii=False)
    for key, value in compact.items():
        text = text.replace(f'"{key}"', value)
    json.loads(text)  # the substitution must keep it valid JSON
    return text + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    home = Path(os.environ.get("KILN_TEST_HOME", Path.home() / ".cache" / "kiln" / "home"))
    ap.add_argument("--models-dir", type=Path, default=home / "models")
    ap.add_argument("--only", nargs="*", choices=sorted(MODELS), help="regenerate only these fixtures")
    args = ap.parse_args()

    # The command as someone would type it from the repository root.
    command = " ".join(["python3", "scripts/make_generation_fixtures.py"] + [shlex.quote(a) for a in sys.argv[1:]])

    L.llama_log_set(_log_callback, ctypes.c_void_p(0))
    L.llama_backend_init()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name in args.only or list(MODELS):
        fixture = make_fixture(name, MODELS[name], args.models_dir, command)
        out = OUT_DIR / f"{name}.json"
        out.write_text(to_json(fixture), encoding="utf-8")
        print(f"wrote {out.relative_to(REPO)} (min gap {fixture['min_gap']:.4f}, "
              f"{len(fixture['small_gaps'])} steps with gap < 0.01)", file=sys.stderr)


if __name__ == "__main__":
    main()
