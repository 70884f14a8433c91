"""Regenerates dequant_reference.json: random GGML blocks and their dequantization by the `gguf` PyPI package
(llama.cpp's own Python reference, gguf-py), for llm/tests/model_dequant.rs.

  pip install --target /work/pyref gguf numpy
  PYTHONPATH=/work/pyref python3 llm/tests/data/make_dequant_reference.py > llm/tests/data/dequant_reference.json
"""
import json
import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

rng = np.random.default_rng(1234)
# byte offsets of the f16 scale fields, which must be finite numbers of moderate size
F16_FIELDS = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
              T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}
cases = []
for ty, fields in F16_FIELDS.items():
    block, size = GGML_QUANT_SIZES[ty]
    nblocks = 2 if block == 32 else 1
    raw = bytearray(rng.integers(0, 256, size * nblocks, dtype=np.uint8).tobytes())
    for b in range(nblocks):
        for off in fields:
            v = np.float16(rng.uniform(-0.05, 0.05)).tobytes()
            raw[b * size + off: b * size + off + 2] = v
    out = gguf.quants.dequantize(np.frombuffer(bytes(raw), dtype=np.uint8), ty).astype(np.float32).ravel()
    cases.append({"type": ty.name, "bytes": bytes(raw).hex(), "values": [float("%.9g" % x) for x in out]})
json.dump({"source": "gguf-py %s (gguf.quants.dequantize)" % __import__("importlib.metadata").metadata.version("gguf"), "cases": cases},
          __import__("sys").stdout, separators=(",", ":"))
