"""Secure aggregation with homomorphic encryption (``federation.encryption: he``, :mod:`bsf.fl.he`).

Unit tests: which settings cannot be combined with HE, the site's step-claim rule, where the HE builder goes in
a project's builders, and the server's aggregator on real CKKS ciphertexts against the hand computation.
End to end (slow): a loopback POC deployment with TenSEAL contexts, 2 sites, 2 rounds of Stage 1 at test size:
the server received and aggregated ciphertexts only, holds no secret key, and the decrypted global model equals the
step-weighted FedAvg of the plaintext updates the sites recorded before encrypting; a diverging site's own guard
stops its NaN update before encryption, and the server counts it as rejected. Skipped without TenSEAL (the he extra).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

ts = pytest.importorskip("tenseal")

from nvflare.apis.dxo import MetaKey  # noqa: E402
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType  # noqa: E402

from bsf.config import FederationConfig  # noqa: E402
from bsf.errors import ConfigError  # noqa: E402
from bsf.fl.deploy.poc import HE_BUILDER, SIGNATURE_BUILDER, PocDeployment, with_he_builder  # noqa: E402
from bsf.fl.deploy.privacy import check_encrypted_claim, model_shapes_from_run_config  # noqa: E402
from bsf.fl.deploy.processes import kill_under, processes_under  # noqa: E402
from bsf.fl.he import (  # noqa: E402
    CLIENT_CONTEXT, HE_ROUNDS_FILE, SERVER_CONTEXT, SITE_RECORD_ENV, SITE_RECORD_FOLDER, HEFedAvgAggregator,
    decrypt_global_model, he_meta, read_site_record,
)
from bsf.fl.jobs import JobSpec, export_job, simulate  # noqa: E402

HE = dict(encryption="he", cross_site_eval=False)


@pytest.mark.parametrize("change, key", [
    ({"robust": "median"}, "robust"), ({"algorithm": "fedopt"}, "fedopt"), ({"weigh_by": "cases"}, "weigh_by"),
    ({"cross_site_eval": True}, "cross_site_eval"),
])
def test_he_refuses_settings_that_need_plaintext(change, key):
    with pytest.raises(ConfigError, match=rf"federation.encryption: he .*{key}"):
        FederationConfig(**{**HE, **change})


def test_he_is_refused_in_the_simulator(tmp_path):
    with pytest.raises(ConfigError, match="simulator"):
        simulate(JobSpec(federation=FederationConfig(**HE)), tmp_path)


def test_site_guard_bounds_the_step_claim_of_an_encrypted_update():
    assert check_encrypted_claim("WEIGHT_DIFF", {"NUM_STEPS_CURRENT_ROUND": 4}, local_steps=4) == []
    for claim in (5, 0, 2.0, True, None):
        problems = check_encrypted_claim("WEIGHT_DIFF", {"NUM_STEPS_CURRENT_ROUND": claim}, local_steps=4)
        assert len(problems) == 1 and "NUM_STEPS_CURRENT_ROUND" in problems[0], claim
    assert check_encrypted_claim("METRICS", {}, local_steps=4) == []


def test_he_builder_goes_before_the_signature_builder_once():
    builders = [{"path": "nvflare.lighter.impl.cert.CertBuilder"}, {"path": SIGNATURE_BUILDER}]
    paths = [b["path"] for b in with_he_builder(with_he_builder(builders))]
    assert paths == ["nvflare.lighter.impl.cert.CertBuilder", HE_BUILDER, SIGNATURE_BUILDER]


def _contexts():
    """A client context (secret key) and the server's (none), made as NVFlare's HEBuilder makes them."""
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40],
                     encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)
    ctx.generate_relin_keys()
    ctx.global_scale = 2 ** 40
    client = ts.context_from(ctx.serialize(save_public_key=True, save_secret_key=True, save_galois_keys=False))
    server = ts.context_from(ctx.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False))
    return client, server


class _Planted:
    """Pickles as a call that leaves a marker file: what a planted model file would run if unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code from a model file ran"))


def test_decrypting_a_persisted_global_model_reads_tensors_only(tmp_path):
    import torch

    from bsf.errors import CheckpointError

    client, _ = _contexts()
    (tmp_path / CLIENT_CONTEXT).write_bytes(client.serialize(save_secret_key=True))
    values = np.array([0.5, -1.25, 2.0, 3.5], dtype=np.float32)
    model = tmp_path / "FL_global_model.pt"
    torch.save({"model": {"w": ts.ckks_vector(client, values.tolist()).serialize(), "b": torch.ones(2)}}, model)
    plain = decrypt_global_model(model, tmp_path / CLIENT_CONTEXT, {"w": (2, 2), "b": (2,)})
    assert np.abs(plain["w"] - values.reshape(2, 2)).max() < 1e-4 and plain["b"].tolist() == [1.0, 1.0]

    marker = tmp_path / "pwned"
    torch.save({"model": {"w": _Planted(marker)}}, model)
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        decrypt_global_model(model, tmp_path / CLIENT_CONTEXT, {"w": (2, 2)})
    assert not marker.exists(), "code from the model file ran"


def _encrypted(client, server, update: dict, steps: int, site: str) -> FLModel:
    """A site's result as the server receives it: each tensor times ``steps``, encrypted, in the server's context."""
    params = {k: ts.ckks_vector_from(server, ts.ckks_vector(client, (v.ravel() * steps).tolist()).serialize())
              for k, v in update.items()}
    meta = {"client_name": site, "NUM_STEPS_CURRENT_ROUND": steps, **he_meta(params)}
    return FLModel(params=params, params_type=ParamsType.DIFF, meta=meta, metrics={"train_loss": float(steps)})


def test_aggregator_sums_ciphertexts_to_the_step_weighted_mean():
    client, server = _contexts()
    rng = np.random.default_rng(0)
    shapes = {"a": (3, 4), "b": (5,)}
    updates = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(3)]
    aggregator = HEFedAvgAggregator(min_accepted=1, expected_steps=4)
    aggregator.set_reference({k: np.zeros(s, np.float32) for k, s in shapes.items()})
    assert aggregator.accept_model(_encrypted(client, server, updates[0], 4, "s1"))
    assert aggregator.accept_model(_encrypted(client, server, updates[1], 2, "s2"))
    assert not aggregator.accept_model(_encrypted(client, server, updates[2], 5, "s3"))  # claims more than the job's steps
    plaintext = FLModel(params=updates[2], params_type=ParamsType.DIFF, meta={"client_name": "s4", "NUM_STEPS_CURRENT_ROUND": 1})
    assert not aggregator.accept_model(plaintext)
    result = aggregator.aggregate_model()
    assert result.meta["accepted_sites"] == ["s1", "s2"] and result.meta["rejected_sites"] == ["s3", "s4"]
    assert "not CKKS ciphertext" in result.meta["rejections"][1]["reason"]
    assert result.meta["he_received"]["s4"]["types"] == ["ndarray"]
    assert result.meta[MetaKey.PROCESSED_KEYS] == {"a": True, "b": True}
    assert result.metrics == {"train_loss": pytest.approx((4 * 4 + 2 * 2) / 6)}
    for k, shape in shapes.items():
        expected = (4 * updates[0][k] + 2 * updates[1][k]) / 6
        got = np.asarray(result.params[k].decrypt(secret_key=client.secret_key())).reshape(shape)
        assert np.abs(got - expected).max() < 1e-4


# ------------------------------------------------------------------ end to end on a loopback deployment
SITES = ("site-1", "site-2")
TINY = JobSpec(name="he", federation=FederationConfig(rounds=2, local_steps=1, validate_global=False, **HE),
               run_overrides=["data.crops_per_volume=1"])
DIVERGE = {"overrides": ["optim.lr=1.0e+37", "optim.warmup_steps=0"]}


def _records(site_job: Path, name: str):
    return read_site_record(site_job / SITE_RECORD_FOLDER / f"{name}.npz")


def _fedavg(base: dict, updates: list[tuple[dict, int]]) -> dict:
    total = sum(steps for _, steps in updates)
    return {k: base[k] + sum(steps * u[k] for u, steps in updates) / total for k in base}


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.fixture(scope="module")
def he_poc(tmp_path_factory):
    """One HE deployment; job ``he``: 2 sites x 2 rounds; job ``he_nan``: site-2 diverges (1 round, min_clients 1)."""
    root = tmp_path_factory.mktemp("he_poc")
    poc = PocDeployment(root, sites=SITES, he=True, env={"OMP_NUM_THREADS": "1", SITE_RECORD_ENV: "1"})
    try:
        poc.prepare()
        poc.start()
        jobs = tmp_path_factory.mktemp("he_jobs")
        job_id = poc.submit(export_job(TINY, jobs))
        status = poc.wait(job_id, timeout=600)
        run_dir = poc.download(job_id, root / "results")
        site_config = poc.kit("site-2") / "local" / "bsf_site.yaml"
        site_config.write_text(yaml.safe_dump(DIVERGE))
        nan_spec = replace(TINY, name="he_nan").with_federation(rounds=1, local_steps=2, min_clients=1)
        nan_id = poc.submit(export_job(nan_spec, jobs))
        nan_status = poc.wait(nan_id, timeout=600)
        site_config.unlink()
        nan_dir = poc.download(nan_id, root / "results")
        yield {"poc": poc, "job_id": job_id, "status": status, "run_dir": run_dir,
               "nan_id": nan_id, "nan_status": nan_status, "nan_dir": nan_dir}
    finally:
        poc.stop()
        kill_under(root)
    assert processes_under(root) == []


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_server_aggregates_ciphertexts_only_and_holds_no_secret_key(he_poc):
    poc, run_dir = he_poc["poc"], he_poc["run_dir"]
    assert he_poc["status"] == "FINISHED:COMPLETED"
    rounds = _lines(run_dir / "bsf_rounds.jsonl")
    assert [r["round"] for r in rounds] == [0, 1] and all(sorted(r["accepted_sites"]) == list(SITES) for r in rounds)
    he_rounds = _lines(run_dir / HE_ROUNDS_FILE)
    assert len(he_rounds) == 2
    for record in he_rounds:
        assert sorted(record["received"]) == list(SITES)
        assert all(r == {"types": ["CKKSVector"], "context_has_secret_key": False} for r in record["received"].values())
        assert record["global_model_types"] == ["CKKSVector"] and record["server_context_has_secret_key"] is False
    assert not ts.context_from((poc.kit("server") / "startup" / SERVER_CONTEXT).read_bytes()).has_secret_key()
    assert ts.context_from((poc.kit("site-1") / "startup" / CLIENT_CONTEXT).read_bytes()).has_secret_key()


@pytest.mark.slow
def test_decrypted_global_model_is_the_fedavg_of_the_plaintext_updates(he_poc):
    poc, run_dir, job_id = he_poc["poc"], he_poc["run_dir"], he_poc["job_id"]
    sites = {site: poc.kit(site) / job_id for site in SITES}
    received = {r: _records(sites["site-1"], f"received_r{r}")[0] for r in (0, 1)}
    assert _max_diff(received[1], _records(sites["site-2"], "received_r1")[0]) == 0  # one ciphertext, one decryption
    for r in (0, 1):
        updates = [_records(job, f"update_r{r}") for job in sites.values()]
        assert all(scalars["steps"] == 1 and scalars["kind"].endswith("WEIGHT_DIFF") for _, scalars in updates)
        expected = _fedavg(received[r], [(u, int(s["steps"])) for u, s in updates])
        if r == 0:
            assert _max_diff(received[1], expected) < 1e-4  # what the sites trained from in round 1
        else:
            shapes = model_shapes_from_run_config(run_dir / "app_server" / "config" / "bsf_run.yaml")
            final = decrypt_global_model(run_dir / "app_server" / "FL_global_model.pt",
                                         poc.kit("site-1") / "startup" / CLIENT_CONTEXT, shapes)
            assert _max_diff({k: final[k] for k in expected}, expected) < 1e-4
        assert max(float(np.abs(u[k]).max()) for u, _ in updates for k in u) > 1e-6  # the sites did train
    audit = _lines(sites["site-1"] / "bsf_privacy_audit.jsonl")
    train = [a for a in audit if a["task"] == "train"]
    assert len(train) == 2 and all(a["allowed"] and a["kind"] == "WEIGHT_DIFF" for a in train)
    assert all(t["dtype"] == "float32" for a in train for t in a["tensors"].values())  # the guard saw plaintext


@pytest.mark.slow
def test_a_nan_update_is_stopped_by_the_sites_own_guard_before_encryption(he_poc):
    poc, nan_dir, nan_id = he_poc["poc"], he_poc["nan_dir"], he_poc["nan_id"]
    assert he_poc["nan_status"] == "FINISHED:COMPLETED"
    rounds = _lines(nan_dir / "bsf_rounds.jsonl")
    assert rounds[0]["accepted_sites"] == ["site-1"] and rounds[0]["rejected_sites"] == ["site-2"]
    assert "TASK_RESULT_FILTER_ERROR" in rounds[0]["rejections"][0]["reason"]
    assert sorted(_lines(nan_dir / HE_ROUNDS_FILE)[0]["received"]) == ["site-1"]  # site-2 sent nothing
    site_job = poc.kit("site-2") / nan_id
    audit = [a for a in _lines(site_job / "bsf_privacy_audit.jsonl") if a["task"] == "train"]
    assert audit and not audit[0]["allowed"] and any("holds NaN or Inf" in p for p in audit[0]["problems"])
    assert "REFUSED to send the train result" in (site_job / "log.txt").read_text()
    assert not (site_job / SITE_RECORD_FOLDER / "update_r0.npz").exists()  # the encryptor never saw it
