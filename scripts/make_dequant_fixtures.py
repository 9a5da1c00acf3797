#!/usr/bin/env python3
"""Writes the reference data for kiln-engine's quantized CPU kernels
(crates/kiln-engine/src/kernels/):

- tests/fixtures/kernels/dequant.json: random GGUF blocks of every type the
  kernels support, with their dequantized values as computed by the `gguf`
  Python package (`gguf.quants.dequantize`) and, where llama-cpp-python is
  installed, by ggml's own `dequantize_row_*` (what llama.cpp's get_rows
  uses). Checked by crates/kiln-engine/tests/kernels_dequant.rs.
- tests/fixtures/kernels/ggml_matmul.json: ggml's CPU backend as llama.cpp
  runs it here (the libggml-cpu.so inside llama-cpp-python, called through
  ctypes): activation quantization (`quantize_row_q8_0/q8_1/q8_K`) and whole
  `ggml_mul_mat` graphs computed by the CPU backend, with weights of the types
  llama.cpp repacks (Q4_0, Q4_K with rows % 8 == 0) placed in its CPU_REPACK
  buffer exactly as llama.cpp does by default. Checked by
  crates/kiln-engine/tests/kernels_ggml.rs.

Floats are stored as the hex of their little-endian f32 bytes so comparisons
can be exact; block bytes as hex.

Usage (from the repository root; needs `pip install gguf numpy` and, for
ggml_matmul.json and the ggml dequantization, `pip install llama-cpp-python`):

    python3 scripts/make_dequant_fixtures.py [--seed N]
"""

import argparse
import ctypes as C
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import numpy as np

import gguf

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "tests" / "fixtures" / "kernels"

# name -> (ggml type id, bytes per block, values per block)
TYPES = {
    "F32": (0, 4, 1),
    "F16": (1, 2, 1),
    "Q4_0": (2, 18, 32),
    "Q4_1": (3, 20, 32),
    "Q5_0": (6, 22, 32),
    "Q8_0": (8, 34, 32),
    "Q4_K": (12, 144, 256),
    "Q6_K": (14, 210, 256),
}
# ggml dequantize_row_* symbol per type (libggml-base.so).
DEQUANT_SYMBOLS = {
    "Q4_0": "dequantize_row_q4_0",
    "Q4_1": "dequantize_row_q4_1",
    "Q5_0": "dequantize_row_q5_0",
    "Q8_0": "dequantize_row_q8_0",
    "Q4_K": "dequantize_row_q4_K",
    "Q6_K": "dequantize_row_q6_K",
}


def f16_bytes(values):
    return np.asarray(values, dtype=np.float16).view(np.uint8)


def random_blocks(rng, name, nblocks):
    """Random raw blocks: every quant bit pattern is possible, the f16 scales
    are finite values of a realistic size (some negative)."""
    _, block_bytes, _ = TYPES[name]
    if name == "F32":
        return (rng.standard_normal(nblocks) * 0.5).astype(np.float32).view(np.uint8)
    if name == "F16":
        return (rng.standard_normal(nblocks) * 0.5).astype(np.float16).view(np.uint8)
    b = rng.integers(0, 256, size=(nblocks, block_bytes), dtype=np.uint8)

    def scale(lo, hi, signed):
        v = rng.uniform(lo, hi, size=nblocks)
        if signed:
            v *= rng.choice([-1.0, 1.0], size=nblocks)
        return f16_bytes(v).reshape(nblocks, 2)

    if name in ("Q4_0", "Q5_0", "Q8_0"):
        b[:, 0:2] = scale(0.001, 0.05, True)
    elif name == "Q4_1":
        b[:, 0:2] = scale(0.001, 0.05, False)
        b[:, 2:4] = scale(0.001, 0.2, True)
    elif name == "Q4_K":
        b[:, 0:2] = scale(0.0005, 0.005, False)
        b[:, 2:4] = scale(0.0005, 0.005, False)
    elif name == "Q6_K":
        b[:, 208:210] = scale(0.0005, 0.005, True)
    return b.reshape(-1)


def f32_hex(a):
    """f32 values as the hex of their little-endian bytes (exact, compact)."""
    return np.ascontiguousarray(a, dtype="<f4").reshape(-1).tobytes().hex()


class Ggml:
    """ctypes access to the ggml libraries bundled with llama-cpp-python."""

    def __init__(self):
        import llama_cpp  # noqa: F401  (only to locate the libraries)

        self.lib_dir = Path(llama_cpp.__file__).parent / "lib"
        self.base = C.CDLL(str(self.lib_dir / "libggml-base.so"), mode=C.RTLD_GLOBAL)
        self.cpu = C.CDLL(str(self.lib_dir / "libggml-cpu.so"), mode=C.RTLD_GLOBAL)
        vp = C.c_void_p
        b, c = self.base, self.cpu

        class InitParams(C.Structure):
            _fields_ = [("mem_size", C.c_size_t), ("mem_buffer", vp), ("no_alloc", C.c_bool)]

        self.InitParams = InitParams
        b.ggml_init.restype = vp
        b.ggml_init.argtypes = [InitParams]
        b.ggml_new_tensor_2d.restype = vp
        b.ggml_new_tensor_2d.argtypes = [vp, C.c_int, C.c_int64, C.c_int64]
        b.ggml_mul_mat.restype = vp
        b.ggml_mul_mat.argtypes = [vp, vp, vp]
        b.ggml_new_graph.restype = vp
        b.ggml_new_graph.argtypes = [vp]
        b.ggml_build_forward_expand.argtypes = [vp, vp]
        b.ggml_backend_alloc_ctx_tensors_from_buft.restype = vp
        b.ggml_backend_alloc_ctx_tensors_from_buft.argtypes = [vp, vp]
        b.ggml_backend_alloc_ctx_tensors.restype = vp
        b.ggml_backend_alloc_ctx_tensors.argtypes = [vp, vp]
        b.ggml_backend_tensor_set.argtypes = [vp, vp, C.c_size_t, C.c_size_t]
        b.ggml_backend_tensor_get.argtypes = [vp, vp, C.c_size_t, C.c_size_t]
        b.ggml_backend_graph_compute.restype = C.c_int
        b.ggml_backend_graph_compute.argtypes = [vp, vp]
        b.ggml_backend_reg_dev_get.restype = vp
        b.ggml_backend_reg_dev_get.argtypes = [vp, C.c_size_t]
        b.ggml_backend_reg_get_proc_address.restype = vp
        b.ggml_backend_reg_get_proc_address.argtypes = [vp, C.c_char_p]
        b.ggml_backend_buft_name.restype = C.c_char_p
        b.ggml_backend_buft_name.argtypes = [vp]
        b.ggml_free.argtypes = [vp]
        b.ggml_backend_buffer_free.argtypes = [vp]
        c.ggml_backend_cpu_init.restype = vp
        c.ggml_backend_cpu_reg.restype = vp
        c.ggml_backend_cpu_set_n_threads.argtypes = [vp, C.c_int]
        for name in ("quantize_row_q8_0", "quantize_row_q8_1", "quantize_row_q8_K"):
            getattr(c, name).argtypes = [vp, vp, C.c_int64]
        for name in DEQUANT_SYMBOLS.values():
            getattr(b, name).argtypes = [vp, vp, C.c_int64]
        c.ggml_cpu_init()

        reg = c.ggml_backend_cpu_reg()
        dev = b.ggml_backend_reg_dev_get(reg, 0)
        fp = b.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
        extra = C.CFUNCTYPE(C.POINTER(vp), vp)(fp)(dev)
        self.repack = None
        i = 0
        while extra[i]:
            if b.ggml_backend_buft_name(extra[i]) == b"CPU_REPACK":
                self.repack = extra[i]
            i += 1
        self.backend = c.ggml_backend_cpu_init()
        flags = [
            f for f in ("avx", "avx2", "fma", "f16c", "avx512", "avx512_vnni", "avx_vnni", "llamafile")
            if getattr(c, f"ggml_cpu_has_{f}")()
        ]
        self.features = flags

    def quantize_row(self, kind, x):
        block_bytes = {"Q8_0": 34, "Q8_1": 36, "Q8_K": 292}[kind]
        block_len = 256 if kind == "Q8_K" else 32
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = (C.c_uint8 * (len(x) // block_len * block_bytes))()
        fn = getattr(self.cpu, {"Q8_0": "quantize_row_q8_0", "Q8_1": "quantize_row_q8_1", "Q8_K": "quantize_row_q8_K"}[kind])
        fn(x.ctypes.data, out, len(x))
        return bytes(out)

    def dequantize(self, name, blocks, count):
        out = np.zeros(count, dtype=np.float32)
        getattr(self.base, DEQUANT_SYMBOLS[name])(blocks.ctypes.data, out.ctypes.data, count)
        return out

    def repacked(self, name, rows):
        # ggml_repack_get_optimal_repack_type on x86 with AVX2: Q4_0 and Q4_K
        # (rows % 8 == 0); llama.cpp places such weights in CPU_REPACK.
        return self.repack is not None and name in ("Q4_0", "Q4_K") and rows % 8 == 0

    def mul_mat(self, name, wbytes, rows, cols, x, threads=1):
        b, c = self.base, self.cpu
        n = x.shape[0]
        ctx_w = b.ggml_init(self.InitParams(1 << 20, None, True))
        w = b.ggml_new_tensor_2d(ctx_w, TYPES[name][0], cols, rows)
        if self.repacked(name, rows):
            buf_w = b.ggml_backend_alloc_ctx_tensors_from_buft(ctx_w, self.repack)
        else:
            buf_w = b.ggml_backend_alloc_ctx_tensors(ctx_w, self.backend)
        b.ggml_backend_tensor_set(w, wbytes, 0, len(wbytes))
        ctx = b.ggml_init(self.InitParams(1 << 22, None, True))
        xt = b.ggml_new_tensor_2d(ctx, 0, cols, n)
        y = b.ggml_mul_mat(ctx, w, xt)
        graph = b.ggml_new_graph(ctx)
        b.ggml_build_forward_expand(graph, y)
        buf_x = b.ggml_backend_alloc_ctx_tensors(ctx, self.backend)
        xb = np.ascontiguousarray(x, dtype=np.float32).tobytes()
        b.ggml_backend_tensor_set(xt, xb, 0, len(xb))
        c.ggml_backend_cpu_set_n_threads(self.backend, threads)
        if b.ggml_backend_graph_compute(self.backend, graph) != 0:
            raise RuntimeError("ggml graph compute failed")
        out = (C.c_float * (n * rows))()
        b.ggml_backend_tensor_get(y, out, 0, 4 * n * rows)
        b.ggml_backend_buffer_free(buf_x)
        b.ggml_backend_buffer_free(buf_w)
        b.ggml_free(ctx)
        b.ggml_free(ctx_w)
        return np.frombuffer(out, dtype=np.float32).reshape(n, rows).copy()


def activations(rng, n, cols):
    """Activation rows of a realistic shape: mostly N(0, 1), a few outliers,
    one block of zeros and, in the second row, exact rounding ties."""
    x = rng.standard_normal((n, cols)).astype(np.float32)
    x[0, 5] = 9.5
    if cols >= 64:
        x[0, 32:64] = 0.0
    if n > 1:
        # max 127 in each 32-block: values k + 0.5 sit exactly on ties.
        for start in range(0, cols, 32):
            x[1, start] = 127.0
            x[1, start + 1 : start + 9] = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5]
    return x


def dequant_cases(rng, ggml):
    cases = []
    for name, (_, block_bytes, block_len) in TYPES.items():
        nblocks = {1: 64, 32: 6, 256: 3}[block_len]
        blocks = random_blocks(rng, name, nblocks)
        count = nblocks * block_len
        qtype = getattr(gguf.GGMLQuantizationType, name)
        want = gguf.quants.dequantize(blocks, qtype).astype(np.float32).reshape(-1)
        case = {"type": name, "values": count, "blocks_hex": blocks.tobytes().hex(), "gguf_f32_hex": f32_hex(want)}
        if ggml is not None and name in DEQUANT_SYMBOLS:
            case["ggml_f32_hex"] = f32_hex(ggml.dequantize(name, blocks, count))
        cases.append(case)
    return cases


def quantize_cases(rng, ggml):
    cases = []
    for kind, cols in (("Q8_0", 512), ("Q8_1", 512), ("Q8_K", 1024)):
        x = activations(rng, 3, cols)
        # Q8_K: a block whose largest magnitude is negative, and one of zeros.
        x[2, 256:512] *= 0.01
        x[2, 300] = -3.0
        x[2, 512:768] = 0.0
        for row in x:
            cases.append({"kind": kind, "x_f32_hex": f32_hex(row), "ggml_hex": ggml.quantize_row(kind, row).hex()})
    return cases


# (type, rows, cols, n): n = 1 is ggml's decode path for every type; larger
# batches reach tinyBLAS (F32, F16, Q4_0/Q5_0/Q8_0 when not repacked), the
# repacked GEMM (Q4_K groups of 4) and the tiled K-quant kernel (n >= 8).
MATMUL_SHAPES = [
    ("F32", 16, 544, 1), ("F32", 16, 512, 3),
    ("F16", 16, 544, 1), ("F16", 16, 512, 3),
    ("Q4_0", 16, 512, 1), ("Q4_0", 16, 512, 9), ("Q4_0", 12, 512, 1), ("Q4_0", 12, 512, 5),
    ("Q4_1", 24, 576, 1), ("Q4_1", 24, 576, 9),
    ("Q5_0", 16, 640, 1), ("Q5_0", 16, 640, 9),
    ("Q8_0", 16, 640, 1), ("Q8_0", 16, 640, 9),
    ("Q4_K", 16, 1024, 1), ("Q4_K", 16, 1024, 9), ("Q4_K", 12, 1024, 1), ("Q4_K", 12, 1024, 3),
    ("Q6_K", 16, 1024, 1), ("Q6_K", 16, 1024, 7), ("Q6_K", 16, 1024, 9),
]


def matmul_cases(rng, ggml):
    cases = []
    for name, rows, cols, n in MATMUL_SHAPES:
        _, _, block_len = TYPES[name]
        w = random_blocks(rng, name, rows * cols // block_len)
        x = activations(rng, n, cols)
        y = ggml.mul_mat(name, w.tobytes(), rows, cols, x)
        y2 = ggml.mul_mat(name, w.tobytes(), rows, cols, x, threads=2)
        if not np.array_equal(y.view(np.uint32), y2.view(np.uint32)):
            raise RuntimeError(f"ggml's {name} result depends on the thread count")
        cases.append({
            "type": name,
            "rows": rows,
            "cols": cols,
            "n": n,
            "repacked": ggml.repacked(name, rows),
            "weights_hex": w.tobytes().hex(),
            "x_f32_hex": f32_hex(x),
            "y_f32_hex": f32_hex(y),
        })
    return cases


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=20261124)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    try:
        ggml = Ggml()
    except (ImportError, OSError) as e:
        print(f"llama-cpp-python's ggml is not usable ({e}); writing dequant.json only", file=sys.stderr)
        ggml = None

    generator = {
        "command": "python3 scripts/make_dequant_fixtures.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "seed": args.seed,
        "gguf": gguf.__version__ if hasattr(gguf, "__version__") else _dist_version("gguf"),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    dequant = {"generator": generator, "cases": dequant_cases(rng, ggml)}
    (OUT_DIR / "dequant.json").write_text(json.dumps(dequant, separators=(",", ":")) + "\n")
    print(f"wrote {OUT_DIR / 'dequant.json'}")
    if ggml is None:
        return
    generator = dict(generator)
    generator["llama_cpp_python"] = _dist_version("llama_cpp_python")
    generator["ggml_cpu_features"] = ggml.features
    out = {"generator": generator, "quantize": quantize_cases(rng, ggml), "matmul": matmul_cases(rng, ggml)}
    (OUT_DIR / "ggml_matmul.json").write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(f"wrote {OUT_DIR / 'ggml_matmul.json'}")


def _dist_version(name):
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    os.environ.setdefault("GGML_CPU_TILED_MM", "1")  # llama.cpp's default
    main()
