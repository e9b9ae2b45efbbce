"""Cost of ``federation.encryption: he``: bytes and seconds per round, with and without HE.

::

    .venv/bin/python benchmarks/he_overhead.py --out /tmp/he_bench          # both parts
    .venv/bin/python benchmarks/he_overhead.py --out /tmp/he_bench --no-poc # bytes and HE compute only

1. Bytes (no NVFlare run): a site's Stage 1 encoder update at test size, encrypted with a context made as NVFlare's
   ``HEBuilder`` makes it (CKKS, 8192, [60, 40, 40], 2^40): the upload as NVFlare's CKKS decomposer frames it
   (each tensor's ciphertext plus the context it carries), the download as :class:`bsf.fl.he.HEFedAvg` sends it
   (serialized ciphertexts), against float32 plaintext; the seconds of encrypting, summing 2 sites and decrypting.
   The Small encoder's bytes follow from the measured ratios.
2. Seconds per round (POC on loopback, 2 sites, Stage 1 test size, 3 rounds x 1 local step): the server log's round
   starts, with and without HE.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from datetime import datetime
from pathlib import Path

import numpy as np


def _context():
    import tenseal as ts

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40],
                     encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)
    ctx.generate_relin_keys()
    ctx.global_scale = 2 ** 40
    return ctx


def encoder_shapes(size: str) -> dict[str, tuple[int, ...]]:
    from bsf.engine import load_config
    from bsf.federation.payload import exchanged_shapes

    return dict(exchanged_shapes(load_config("stage1_test", overrides=[f"model.size={size}"]), "encoder"))


def bytes_and_compute(size: str = "test") -> dict:
    import tenseal as ts

    ctx = _context()
    context_bytes = len(ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False))
    rng = np.random.default_rng(0)
    shapes = encoder_shapes(size)
    updates = [{k: rng.normal(scale=1e-4, size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(2)]
    started = time.perf_counter()
    encrypted = [{k: ts.ckks_vector(ctx, v.ravel()) for k, v in u.items()} for u in updates]
    encrypt_s = (time.perf_counter() - started) / 2
    vector_bytes = sum(len(v.serialize()) for v in encrypted[0].values())
    started = time.perf_counter()
    total = {k: (encrypted[0][k] + encrypted[1][k]) * 0.5 for k in shapes}
    sum_s = time.perf_counter() - started
    started = time.perf_counter()
    mean = {k: np.asarray(v.decrypt()).reshape(shapes[k]) for k, v in total.items()}
    decrypt_s = time.perf_counter() - started
    error = max(float(np.abs(mean[k] - (updates[0][k] + updates[1][k]) / 2).max()) for k in shapes)
    plain = 4 * sum(int(np.prod(s)) for s in shapes.values())
    upload = vector_bytes + len(shapes) * context_bytes
    return {"size": size, "tensors": len(shapes), "values": plain // 4, "plaintext_bytes": plain,
            "upload_bytes": upload, "download_bytes": vector_bytes, "context_bytes_per_tensor": context_bytes,
            "upload_ratio": upload / plain, "download_ratio": vector_bytes / plain,
            "encrypt_s": encrypt_s, "sum2_s": sum_s, "decrypt_s": decrypt_s, "max_abs_error": error}


def _round_starts(log: Path) -> list[datetime]:
    """Timestamps of the server's ``Round N started`` banners (the last timestamped line before each)."""
    stamps, last = [], None
    for line in log.read_text().splitlines():
        match = re.match(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})", line)
        if match:
            last = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
        if re.search(r"Round \d+ started", line) and last is not None:
            stamps.append(last)
        if "Finished FedAvg" in line and last is not None:
            stamps.append(last)
    return stamps


def poc_round_seconds(out: Path, he: bool, rounds: int = 3) -> list[float]:
    from bsf.config import FederationConfig
    from bsf.fl.deploy.poc import PocDeployment
    from bsf.fl.jobs import JobSpec, export_job

    spec = JobSpec(name="he" if he else "plain", run_overrides=["data.crops_per_volume=1"], federation=FederationConfig(
        rounds=rounds, local_steps=1, validate_global=False, cross_site_eval=False, encryption="he" if he else "none"))
    with PocDeployment(out / spec.name, he=he, env={"OMP_NUM_THREADS": "1"}) as poc:
        poc.start()
        job_id = poc.submit(export_job(spec, out / "jobs"))
        status = poc.wait(job_id, timeout=1200)
        run_dir = poc.download(job_id, out / "results")
    if status != "FINISHED:COMPLETED":
        raise SystemExit(f"{spec.name}: {status}")
    stamps = _round_starts(run_dir / "log.txt")
    return [round((b - a).total_seconds(), 1) for a, b in zip(stamps, stamps[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--no-poc", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"test": bytes_and_compute("test")}
    small = encoder_shapes("small")
    plain_small = 4 * sum(int(np.prod(s)) for s in small.values())
    result["small_computed"] = {"plaintext_bytes": plain_small,
                                "upload_bytes": plain_small * result["test"]["upload_ratio"],
                                "download_bytes": plain_small * result["test"]["download_ratio"]}
    if not args.no_poc:
        result["poc_round_seconds"] = {"none": poc_round_seconds(out, he=False), "he": poc_round_seconds(out, he=True)}
    print(json.dumps(result, indent=2))
    (out / "he_overhead.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
