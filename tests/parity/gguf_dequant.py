"""Dequantizes every block-quantized tensor of a GGUF file with gguf-py
(llama.cpp's own Python package), the reference for llmos' dequantization.

Usage: gguf_dequant.py FILE.gguf OUT_DIR
Writes OUT_DIR/<tensor name>.f32 (little-endian float32, row-major) and
OUT_DIR/tensors.json: [{"name", "type", "file"}, ...].
"""

import json
import os
import sys

import numpy as np
from gguf import GGUFReader
from gguf.constants import GGMLQuantizationType as T
from gguf.quants import dequantize

path, out = sys.argv[1:3]
plain = {T.F32, T.F16, T.BF16}
listed = []
for t in GGUFReader(path).tensors:
    if t.tensor_type in plain:
        continue
    values = dequantize(t.data, t.tensor_type).astype("<f4")
    f = os.path.join(out, f"{t.name}.f32")
    values.tofile(f)
    listed.append({"name": t.name, "type": t.tensor_type.name, "file": f})
with open(os.path.join(out, "tensors.json"), "w") as fh:
    json.dump(listed, fh)
