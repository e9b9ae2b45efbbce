"""The result guard: only the model's tensors and numbers may leave a site, whatever the site is configured to do.

The end-to-end capture (every result two POC sites sent) is in ``tests/test_deploy_poc.py``; here the
guard's rules and its NVFlare filter are driven directly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.shareable import make_reply

from bsf.fl.deploy.privacy import AUDIT_FILE, ResultGuard, ResultRefused, check_result, model_shapes_from_run_config
from bsf.fl.jobs import JobSpec, job_run_config
from tests.nvflare_fakes import site_context

SHAPES = {"swinViT.patch_embed.proj.weight": (12, 2, 2, 2, 2), "swinViT.norm.bias": (12,)}


def _weights(**extra) -> dict[str, np.ndarray]:
    out = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    out.update(extra)
    return out


def test_model_weights_and_numbers_may_leave():
    meta = {"NUM_STEPS_CURRENT_ROUND": 4, "num_cases": 10, "site_step": 8,
            "initial_metrics": {"train_loss": 1.5, "val_reconstruction_l1": np.float32(0.25)}}
    headers = {"current_round": 1, "start_round": 0, "__content_type__": "DXO"}
    assert check_result(DataKind.WEIGHT_DIFF, _weights(), meta, headers, SHAPES) == []
    assert check_result(DataKind.METRICS, {"val_dice_mean": 0.5, "val_dice_tc": 0.25}, {}, {}, SHAPES) == []
    half = {k: v.astype(np.float16) for k, v in _weights().items()}
    assert check_result(DataKind.WEIGHTS, half, {}, {}, SHAPES) == []


@pytest.mark.parametrize(
    "data, meta, expected",
    [
        (_weights(image=np.zeros((1, 64, 64, 64), np.float32)), {}, "'image' is not a tensor of the job's model"),
        (_weights(**{"swinViT.norm.bias": np.zeros((64, 64, 64), np.float32)}), {}, "has shape (64, 64, 64)"),
        (_weights(**{"swinViT.norm.bias": np.array(["/data/ukb/1_20252_2_0/T1.nii.gz"] * 12)}), {}, "not float16/float32/float64"),
        (_weights(**{"swinViT.norm.bias": [0.0] * 12}), {}, "not a NumPy array"),
        (_weights(**{"swinViT.norm.bias": np.full(12, np.nan, np.float32)}), {}, "holds NaN or Inf"),
        (_weights(**{"/data/x.nii.gz": np.zeros(1, np.float32)}), {}, "'/data/x.nii.gz' is not a tensor of the job's model"),
        (_weights(), {"files": "/data/ukb/1_20252_2_0/T1.nii.gz"}, "meta key 'files' is not allowed"),
        (_weights(), {"per_case_dice": [0.1, 0.9]}, "meta key 'per_case_dice' is not allowed"),
        (_weights(), {"labels": np.zeros((8, 8), np.uint8)}, "meta key 'labels' is not allowed"),
        (_weights(), {"initial_metrics": {"case_ids": "BraTS2021_00000"}}, "meta['initial_metrics'] name 'case_ids' is not a metric"),
        (_weights(), {"client_name": "/data/site-1"}, "meta['client_name'] '/data/site-1' is not an identifier"),
    ],
)
def test_anything_else_is_refused(data, meta, expected):
    problems = check_result(DataKind.WEIGHT_DIFF, data, meta, {}, SHAPES)
    assert any(expected in p for p in problems), problems


def test_other_payload_kinds_and_headers_are_refused():
    assert "may not leave" in check_result(DataKind.COLLECTION, {"a": 1}, {}, {}, SHAPES)[0]
    assert check_result(DataKind.METRICS, {"per_case": [0.1, 0.2]}, {}, {}, SHAPES)
    assert check_result(DataKind.WEIGHTS, _weights(), {}, {"blob": np.zeros(3)}, SHAPES)
    assert check_result(DataKind.WEIGHTS, _weights(), {}, {"current_round": "x" * 1000}, SHAPES)
    assert "model is unknown" in check_result(DataKind.WEIGHTS, _weights(), {}, {}, None)[0]


# ------------------------------------------------------------------ the NVFlare filter
@pytest.fixture
def guard_ctx(tmp_path):
    app = tmp_path / "job1" / "app_site-1"
    (app / "config").mkdir(parents=True)
    (app / "config" / "bsf_run.yaml").write_text(yaml.safe_dump(job_run_config(JobSpec())))
    ctx = site_context(tmp_path, app)
    return ctx, tmp_path / "job1" / AUDIT_FILE, model_shapes_from_run_config(app / "config" / "bsf_run.yaml")


def test_guard_passes_an_encoder_update_and_audits_it(guard_ctx):
    ctx, audit, shapes = guard_ctx
    encoder = {k: np.zeros(s, np.float32) for k, s in shapes.items() if k.startswith("swinViT.")}
    shareable = DXO(DataKind.WEIGHT_DIFF, data=encoder, meta={"NUM_STEPS_CURRENT_ROUND": 2}).to_shareable()
    assert ResultGuard().process(shareable, ctx) is shareable
    record = json.loads(audit.read_text())
    assert record["allowed"] and record["site"] == "site-1" and set(record["tensors"]) == set(encoder)
    assert record["bytes"] == sum(v.nbytes for v in encoder.values())


def test_guard_refuses_data_smuggled_under_any_site_setting(guard_ctx):
    ctx, audit, shapes = guard_ctx
    key = next(iter(shapes))
    shareable = DXO(DataKind.WEIGHTS, data={key: np.zeros(shapes[key], np.float32)},
                    meta={"datalist": "/data/brats/datalist.json"}).to_shareable()
    with pytest.raises(ResultRefused, match="REFUSED.*datalist"):
        ResultGuard().process(shareable, ctx)
    shareable = DXO(DataKind.WEIGHTS, data={key: np.zeros(shapes[key], np.float32)}).to_shareable()
    shareable["extra"] = {"case": "BraTS2021_00000"}
    with pytest.raises(ResultRefused, match="outside the DXO"):
        ResultGuard().process(shareable, ctx)
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [r["allowed"] for r in records] == [False, False]


def test_guard_strips_error_replies(guard_ctx):
    ctx, _, _ = guard_ctx
    reply = make_reply(ReturnCode.EXECUTION_EXCEPTION)
    reply["leak"] = "/data/x.nii.gz"
    out = ResultGuard().process(reply, ctx)
    assert out.get_return_code() == ReturnCode.EXECUTION_EXCEPTION and "leak" not in out
