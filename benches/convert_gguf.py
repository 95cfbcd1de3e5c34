"""Rewrites a GGUF with every tensor dequantized to F32 or BF16 (same weights,
same metadata), so peers can be compared at equal precision; or with every
matrix requantized to Q8_0 (from the dequantized values; norms stay F32),
for a Q8_0 file of the same model.

Usage: convert_gguf.py IN.gguf OUT.gguf f32|bf16|q8_0
"""

import sys

import gguf
import numpy as np
from gguf.quants import dequantize, quantize


def main():
    src, dst, kind = sys.argv[1:4]
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
