#!/usr/bin/env python3
"""The Python `gguf` package (the writer llama.cpp ships) on the other side of bitexact's GGUF
tests.

    pyref.py make DIR   write DIR/their.gguf, a tiny qwen3moe model whose Q8_0 tensors the
                        package quantized, and DIR/their.json + DIR/their.f32: the package's own
                        dequantization of every tensor
    pyref.py quants DIR write DIR/quants.gguf: one tensor per format the package has a quantizer
                        for (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, MXFP4), values of several scales with
                        zeros and ties among them, and DIR/quants.json + DIR/quants.f32: the
                        package's dequantization of each
    pyref.py read FILE DIR
                        read FILE with the package's reader and write DIR/read.json +
                        DIR/read.f32: its dequantization of every tensor, and the metadata
"""
import json
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf import quants

ARCH = "qwen3moe"
CFG = dict(layers=2, dim=64, heads=4, kv=2, hd=16, experts=8, top_k=2, ffn=64, vocab=96, ctx=256)


def dump(tensors, directory, stem, meta=None):
    index, offset = [], 0
    with open(f"{directory}/{stem}.f32", "wb") as out:
        for name, values in tensors:
            flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
            out.write(flat.tobytes())
            index.append({"name": name, "offset": offset, "len": int(flat.size)})
            offset += int(flat.size)
    with open(f"{directory}/{stem}.json", "w") as f:
        json.dump({"tensors": index, "metadata": meta or {}}, f)


def make(directory):
    c = CFG
    rng = np.random.default_rng(1234)
    w = gguf.GGUFWriter(f"{directory}/their.gguf", ARCH)
    w.add_name("pyref-tiny")
    w.add_block_count(c["layers"])
    w.add_context_length(c["ctx"])
    w.add_embedding_length(c["dim"])
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv"])
    w.add_key_length(c["hd"])
    w.add_value_length(c["hd"])
    w.add_rope_dimension_count(c["hd"])
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(c["experts"])
    w.add_expert_used_count(c["top_k"])
    w.add_expert_feed_forward_length(c["ffn"])
    deq = []

    def f32(name, shape, scale=1.0):
        v = (rng.standard_normal(shape) * scale).astype(np.float32)
        w.add_tensor(name, v)
        deq.append((name, v))

    def q8(name, shape, scale):
        v = (rng.standard_normal(shape) * scale).astype(np.float32)
        q = quants.quantize(v, T.Q8_0)
        w.add_tensor(name, q, raw_dtype=T.Q8_0)
        deq.append((name, quants.dequantize(q, T.Q8_0)))

    d, hd, e, f = c["dim"], c["hd"], c["experts"], c["ffn"]
    f32("token_embd.weight", (c["vocab"], d))
    f32("output_norm.weight", (d,), 0.1)
    q8("output.weight", (c["vocab"], d), d ** -0.5)
    for l in range(c["layers"]):
        p = f"blk.{l}."
        f32(p + "attn_norm.weight", (d,), 0.1)
        f32(p + "attn_q_norm.weight", (hd,), 0.1)
        f32(p + "attn_k_norm.weight", (hd,), 0.1)
        f32(p + "ffn_norm.weight", (d,), 0.1)
        q8(p + "attn_q.weight", (c["heads"] * hd, d), d ** -0.5)
        q8(p + "attn_k.weight", (c["kv"] * hd, d), d ** -0.5)
        q8(p + "attn_v.weight", (c["kv"] * hd, d), d ** -0.5)
        q8(p + "attn_output.weight", (d, c["heads"] * hd), d ** -0.5)
        f32(p + "ffn_gate_inp.weight", (e, d), d ** -0.5)
        q8(p + "ffn_gate_exps.weight", (e, f, d), d ** -0.5)
        q8(p + "ffn_up_exps.weight", (e, f, d), d ** -0.5)
        q8(p + "ffn_down_exps.weight", (e, d, f), f ** -0.5)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    dump(deq, directory, "their", {"config": c})


def quants_file(directory):
    rng = np.random.default_rng(4321)
    w = gguf.GGUFWriter(f"{directory}/quants.gguf", ARCH)
    deq = []
    for ty in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.MXFP4):
        # 64 rows of 256: each row its own scale (1e-6 .. 1e4), every 7th row all one value, and
        # some exact zeros and repeated maxima (the quantizers' argmax ties).
        v = rng.standard_normal((64, 256)).astype(np.float32)
        v *= np.logspace(-6, 4, 64, dtype=np.float32)[:, None]
        v[::7] = v[::7, :1]
        v[:, 5::11] = 0.0
        v[3, 40:72] = v[3, 40]
        q = quants.quantize(v, ty)
        name = f"q.{ty.name.lower()}"
        w.add_tensor(name, q, raw_dtype=ty)
        deq.append((name, quants.dequantize(q, ty)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    dump(deq, directory, "quants")


def read(path, directory):
    r = gguf.GGUFReader(path)
    out = []
    for t in r.tensors:
        out.append((t.name, quants.dequantize(t.data, t.tensor_type)))
    meta = {}
    for field in r.fields.values():
        if len(field.types) == 1 and field.types[0] in (gguf.GGUFValueType.UINT32, gguf.GGUFValueType.INT32,
                                                       gguf.GGUFValueType.UINT64, gguf.GGUFValueType.FLOAT32):
            meta[field.name] = float(field.parts[field.data[0]][0])
        elif len(field.types) == 1 and field.types[0] == gguf.GGUFValueType.STRING:
            meta[field.name] = bytes(field.parts[field.data[0]]).decode()
    dump(out, directory, "read", meta)


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2])
    elif sys.argv[1] == "quants":
        quants_file(sys.argv[2])
    elif sys.argv[1] == "read":
        read(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
