"""Bytes of one round's NVFlare messages per site, as NVFlare serializes them (FOBS), and the float16 options compared.

For each model size and scope, the train result a site sends (``FLModel`` -> ``Shareable`` -> ``fobs.dumps``, the
bytes NVFlare's cell layer carries, before TLS/gRPC framing) and the global model it receives:

* ``f32 with buffers``: every state-dict entry, as the site sent it before issue 14;
* ``f32``: without the constant ``relative_position_index`` buffers (:mod:`bsf.federation.payload`);
* ``f16 own``: the project's ``federation.transfer_dtype: float16`` (the site casts its difference);
* ``f16 ModelQuantizer``: NVFlare's ``ModelQuantizer("float16")`` filter applied to the float32 result (what the
  server's ``ModelDequantizer`` would undo), with the seconds it takes and its quantization state. NVFlare 2.9's
  quantizer and dequantizer import ``bitsandbytes`` at module level, also for plain float16; without it the row
  says so (``null``) instead of a number.

    .venv/bin/python benchmarks/wire_bytes.py                 # test and small
    .venv/bin/python benchmarks/wire_bytes.py --sizes test
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def _message_bytes(params: dict[str, np.ndarray], meta: dict | None = None) -> int:
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
    from nvflare.app_common.utils.fl_model_utils import FLModelUtils
    from nvflare.fuel.utils import fobs

    shareable = FLModelUtils.to_shareable(FLModel(params=params, params_type=ParamsType.DIFF, meta=meta or {"NUM_STEPS_CURRENT_ROUND": 10}))
    return len(fobs.dumps(shareable))


def _quantizer(params: dict[str, np.ndarray]) -> tuple[int, float, float]:
    """NVFlare's float16 ModelQuantizer on ``params``: message bytes, quantize seconds, max relative round-trip error."""
    from nvflare.apis.dxo import DXO, DataKind, from_shareable
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_opt.pt.quantization.dequantizer import ModelDequantizer
    from nvflare.app_opt.pt.quantization.quantizer import ModelQuantizer
    from nvflare.fuel.utils import fobs

    ctx = FLContext()
    original = {k: v.copy() for k, v in params.items()}
    dxo = DXO(data_kind=DataKind.WEIGHT_DIFF, data=params, meta={"NUM_STEPS_CURRENT_ROUND": 10})
    started = time.perf_counter()
    quantized = ModelQuantizer("float16").process_dxo(dxo, dxo.to_shareable(), ctx)
    seconds = time.perf_counter() - started
    size = len(fobs.dumps(quantized.to_shareable()))
    restored = ModelDequantizer().process_dxo(from_shareable(fobs.loads(fobs.dumps(quantized.to_shareable()))), None, ctx)
    err = max(float(np.abs(restored.data[k].astype(np.float32) - original[k]).max() / (np.abs(original[k]).max() + 1e-30))
              for k in original)
    return size, seconds, err


def rows(sizes: list[str]) -> list[dict]:
    from nvflare.app_common.decomposers import common_decomposers

    from bsf.federation.payload import exchanged
    from bsf.model import SSLModel, build_swin_unetr, select_weights

    common_decomposers.register()
    out = []
    rng = np.random.default_rng(0)
    for size in sizes:
        for label, model, scope in (("encoder (Stages 1/2)", SSLModel(size, 2), "encoder"),
                                    ("SwinUNETR (Stage 3)", build_swin_unetr(size, 4, 3), "all")):
            full = {k: v.float().numpy() for k, v in select_weights(model.state_dict(), scope).items()}
            # a weight difference of a plausible scale (1e-4 of the weights), float32
            diff = {k: (rng.standard_normal(v.shape) * 1e-4).astype(np.float32) for k, v in exchanged(full).items()}
            row = {"size": size, "part": label, "tensor_bytes_f32": int(sum(v.nbytes for v in diff.values())),
                   "f32_with_buffers": _message_bytes(full), "f32": _message_bytes(diff),
                   "f16_own": _message_bytes({k: v.astype(np.float16) for k, v in diff.items()})}
            started = time.perf_counter()
            _ = {k: v.astype(np.float16) for k, v in diff.items()}
            row["f16_own_seconds"] = time.perf_counter() - started
            try:
                row["f16_quantizer"], row["f16_quantizer_seconds"], row["f16_quantizer_max_rel_error"] = _quantizer(diff)
            except ImportError as exc:  # bitsandbytes
                row.update(f16_quantizer=None, f16_quantizer_seconds=None, f16_quantizer_max_rel_error=None,
                           f16_quantizer_unavailable=str(exc))
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["test", "small"])
    args = parser.parse_args()
    print("| size | part | f32 with buffers | f32 | f16 own | f16 ModelQuantizer | quantize s (own / NVFlare) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows(args.sizes):
        quantizer = ("not importable" if r["f16_quantizer"] is None else
                     f"{r['f16_quantizer'] / 1e6:.2f} MB")
        nvflare_s = "-" if r["f16_quantizer_seconds"] is None else f"{r['f16_quantizer_seconds']:.3f}"
        print(f"| {r['size']} | {r['part']} | {r['f32_with_buffers'] / 1e6:.2f} MB | {r['f32'] / 1e6:.2f} MB | "
              f"{r['f16_own'] / 1e6:.2f} MB | {quantizer} | {r['f16_own_seconds']:.3f} / {nvflare_s} |")


if __name__ == "__main__":
    main()
