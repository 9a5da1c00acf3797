#!/usr/bin/env python3
"""How far llama.cpp is from itself: replays every real-model prompt of
tests/fixtures/generation/*.json through llama.cpp with the prompt fed one
token per llama_decode call (n_ubatch 1: GEMV kernels, as in decode) instead of
one batched call, teacher-forced on the fixture's tokens, and prints how much
the top-10 logits move and where llama.cpp's own argmax changes (with the
recorded top-2 gap there). This is the envelope the golden test's real-model
rule is stated against.

    python3 scripts/dev/llamacpp_self_consistency.py [--models-dir DIR]
"""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import make_generation_fixtures as G  # noqa: E402

L = G.L


def replay(ref, prompt, forced):
    ctx = L.llama_init_from_model(ref.model, ref.context_params())
    try:
        logits = None
        for t in prompt:
            logits = ref._decode(ctx, [t])
        out = [logits]
        for t in forced[:-1]:
            out.append(ref._decode(ctx, [t]))
        return out
    finally:
        L.llama_free(ctx)


def main():
    ap = argparse.ArgumentParser()
    home = Path(os.environ.get("KILN_TEST_HOME", Path.home() / ".cache/kiln/home"))
    ap.add_argument("--models-dir", type=Path, default=home / "models")
    args = ap.parse_args()
    for name in ["smollm2-135m", "gemma3-270m"]:
        fx = json.loads((G.REPO / f"tests/fixtures/generation/{name}.json").read_text())
        ref = G.Reference(args.models_dir / name / "model.gguf", n_ctx=2048)
        worst_all, flips_all = 0.0, []
        for p in fx["prompts"]:
            forced = [s["token"] for s in p["steps"]]
            logits = replay(ref, p["prompt_tokens"], forced)
            worst = 0.0
            for i, (step, lg) in enumerate(zip(p["steps"], logits)):
                for tid, val in step["top"]:
                    worst = max(worst, abs(float(lg[tid]) - val))
                if int(np.argmax(lg)) != step["token"]:
                    flips_all.append((p["name"], i, step["gap"]))
            worst_all = max(worst_all, worst)
            print(f"{name} / {p['name']}: max |logit diff| {worst:.4f}")
        print(f"{name}: worst {worst_all:.4f}; argmax flips (prompt, step, gap): {flips_all}")
        ref.close()


if __name__ == "__main__":
    main()
