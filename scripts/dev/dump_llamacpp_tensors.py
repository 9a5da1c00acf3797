import ctypes, sys, json, numpy as np, llama_cpp, os
from llama_cpp import Llama
libdir = os.path.join(os.path.dirname(llama_cpp.__file__), 'lib')
g = ctypes.CDLL(os.path.join(libdir, 'libggml-base.so'))
g.ggml_get_name.restype = ctypes.c_char_p; g.ggml_get_name.argtypes=[ctypes.c_void_p]
g.ggml_nelements.restype = ctypes.c_int64; g.ggml_nelements.argtypes=[ctypes.c_void_p]
g.ggml_get_data_f32.restype = ctypes.POINTER(ctypes.c_float); g.ggml_get_data_f32.argtypes=[ctypes.c_void_p]
g.ggml_is_contiguous.restype = ctypes.c_bool; g.ggml_is_contiguous.argtypes=[ctypes.c_void_p]
WANT = set(sys.argv[2].split(','))
out = {}
active = [False]
CB = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p)
def cb(t, ask, ud):
    name = g.ggml_get_name(t).decode()
    if ask: return name in WANT
    if active[0] and name in WANT:
        n = g.ggml_nelements(t)
        # type check: only f32
        p = g.ggml_get_data_f32(t)
        out[name] = [p[i] for i in range(min(n, 4096))] if p else None
    return True
cbf = CB(cb)
llm = Llama(model_path=sys.argv[1], n_ctx=512, n_threads=2, verbose=False, logits_all=True)
llm._ctx.ctx  # ensure
# set callback: need context params before creation; recreate via low-level
params = llama_cpp.llama_context_default_params()
params.n_ctx = 512; params.n_threads = 2; params.n_threads_batch = 2
params.cb_eval = cbf; params.cb_eval_user_data = None
params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
def decode(tok, pos):
    b = llama_cpp.llama_batch_init(1, 0, 1)
    b.n_tokens = 1; b.token[0] = tok; b.pos[0] = pos; b.n_seq_id[0] = 1; b.seq_id[0][0] = 0; b.logits[0] = 1
    r = llama_cpp.llama_decode(ctx, b); llama_cpp.llama_batch_free(b); return r
toks = [int(x) for x in sys.argv[3].split(',')]
for i, t in enumerate(toks):
    active[0] = (i == len(toks)-1)
    decode(t, i)
json.dump(out, open('/tmp/dump.json','w'))
print({k: (len(v) if v else None, v[:4] if v else None) for k, v in out.items()})
