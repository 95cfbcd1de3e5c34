"""Rewrites a GGUF with every tensor dequantized to F32 or BF16 (same weights,
same metadata), so peers can be compared at equal precision; or with every
matrix requantized to Q8_0 (from the dequantized values; norms stay F32),
for a Q8_0 file of the same model; or q4_k_m: llama.cpp's own quantizer
(through llama-cpp-python) makes its Q4_K_M file from IN (an F32 GGUF):
Q4_K and Q6_K where a matrix's rows are whole 256-weight super-blocks, and
llama.cpp's fallbacks (Q5_0, Q8_0) where they are not.

Usage: convert_gguf.py IN.gguf OUT.gguf f32|bf16|q8_0|q4_k_m
"""

import sys

import gguf
import numpy as np
from gguf.quants import dequantize, quantize


def llama_cpp_q4_k_m(src, dst):
    import ctypes

    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize {src} -> {dst}: {rc}")


def main():
    src, dst, kind = sys.argv[1:4]
    if kind == "q4_k_m":
        return llama_cpp_q4_k_m(src, dst)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "bf16": gguf.GGMLQuantizationType.BF16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch)
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "general.file_type":
            w.add_file_type({"f32": 0, "bf16": 32, "q8_0": 7}[kind])
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, field.contents(), vtype, sub_type=sub)
    for t in r.tensors:
        values = dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = [int(x) for x in reversed(t.shape)]
        values = values.reshape(shape)
        if qtype == gguf.GGMLQuantizationType.F32 or values.ndim == 1:
            w.add_tensor(t.name, values)
        else:
            w.add_tensor(t.name, quantize(values, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
