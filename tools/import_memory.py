"""Peak host memory of `jaxpipe import-hf` on a 1 B model (BENCHMARKS.md, "Importing a 1 B model").

`write DIR [--preset llama-3.2-1b] [--dtype bfloat16]` writes a Hugging Face LLaMA directory of that preset's
shapes (config.json + one model.safetensors, random values; nothing downloaded), one tensor at a time.
`import DIR OUT` imports it in this process and prints the process's peak resident memory (ru_maxrss) before
and after, and the largest item's size, so the peak can be set against "one item at a time".
"""

from __future__ import annotations

import argparse
import json
import resource
import struct
import time
from pathlib import Path

import numpy as np


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def write(out: Path, preset: str, dtype: str) -> None:
    import ml_dtypes

    from jaxpipe.config import load_config
    from jaxpipe.export import hf_map

    model = load_config(None, [f"model.preset={preset}", "parallel.pp=1"]).model
    cfg = hf_map.llama_config(model, dtype, 128000, 128001)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    np_dtype = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16}[dtype]
    tag = {"bfloat16": "BF16", "float32": "F32", "float16": "F16"}[dtype]
    tensors = [(n, s) for item in hf_map.item_order(model) for e in hf_map.entries(model, item)
               for n, s in zip(e.hf, e.hf_shapes, strict=True)]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    itemsize = np.dtype(np_dtype).itemsize
    for name, shape in tensors:
        size = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(0)
    with open(out / "model.safetensors", "wb") as f:  # the safetensors layout, streamed tensor by tensor
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, shape in tensors:
            f.write((rng.standard_normal(shape, np.float32) * 0.02).astype(np_dtype).tobytes())
    print(f"{out}: {len(tensors)} tensors, {offset / 2**30:.2f} GiB of {dtype}")


def run_import(hf_dir: Path, out: Path) -> None:
    import threading

    import orbax.checkpoint  # noqa: F401 (the libraries' own footprint belongs to "before")

    import jaxpipe.export.hf_import as hf_import
    from jaxpipe.export import hf_map

    peaks = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample() -> None:  # anonymous memory (the arrays) apart from mapped file pages (page cache)
        while not done.is_set():
            for line in Path("/proc/self/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in peaks:
                    peaks[key] = max(peaks[key], int(value.split()[0]))
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    before = _peak_gib()
    t0 = time.perf_counter()
    ckpt = hf_import.import_hf(hf_dir, out)
    took = time.perf_counter() - t0
    done.set()
    model = hf_map.model_from_hf(json.loads((hf_dir / "config.json").read_text()))
    largest = max(sum(int(np.prod(s)) for e in hf_map.entries(model, item) for s in e.hf_shapes)
                  for item in hf_map.item_order(model)) * 4 / 2**30
    total = sum(int(np.prod(s)) for item in hf_map.item_order(model) for e in hf_map.entries(model, item)
                for s in e.hf_shapes) * 4 / 2**30
    print(f"peak RSS before the import {before:.2f} GiB, after {_peak_gib():.2f} GiB; the model in float32 "
          f"{total:.2f} GiB, its largest item {largest:.2f} GiB; peak anonymous memory "
          f"{peaks['RssAnon'] / 2**20:.2f} GiB, "
          f"peak mapped file pages {peaks['RssFile'] / 2**20:.2f} GiB; {took:.0f} s; {ckpt}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("dir", type=Path)
    w.add_argument("--preset", default="llama-3.2-1b")
    w.add_argument("--dtype", default="bfloat16")
    i = sub.add_parser("import")
    i.add_argument("dir", type=Path)
    i.add_argument("out", type=Path)
    args = ap.parse_args()
    if args.cmd == "write":
        write(args.dir, args.preset, args.dtype)
    else:
        run_import(args.dir, args.out)
