"""Secure aggregation with homomorphic encryption (``federation.encryption: he``): the server sums ciphertexts only.

NVFlare's CKKS components (TenSEAL) wired into this project's jobs; each round:

1. the server sends the global model: plaintext in round 0, afterwards the ciphertext sum it holds;
2. the site decrypts it (:class:`SiteHEDecryptor`, a task-data filter of the job: NVFlare's decryptor, then
   every tensor back to the model's shape and float32) and trains from it;
3. the site's result filters run in this order: the site's own ``privacy.json`` scope (optional DP filter, then
   :class:`bsf.fl.deploy.privacy.ResultGuard`: keys, shapes, finite, numbers only, the step claim within the
   job's local steps), then the job's :class:`SiteHEEncryptor` (NVFlare's encryptor: each tensor times the
   site's step count, then encrypted). A result the guard refuses leaves as an error reply with no data;
4. the server (:class:`HEFedAvg` with :class:`HEFedAvgAggregator`) accepts only ciphertexts of the global
   model's keys and sizes, sums them and scales the sum by ``1 / sum of step counts``, adds it to the
   global model (a ciphertext from then on) and persists it through :class:`HEModelPersistor` (serialized
   ciphertexts in ``FL_global_model.pt``). The server's context (``server_context.tenseal``) holds no
   secret key: it can add and scale, never decrypt.

What the server records per round (``bsf_he_rounds.jsonl`` in its run folder): the types it received from
each site and aggregated, and whether any context it holds (its own, or those the ciphertexts carry) has a
secret key. Decrypting a persisted global model needs a site's ``client_context.tenseal``:
:func:`decrypt_global_model`.

A site can keep its own record of what it encrypted and received (``BSF_HE_SITE_RECORD=1`` in the site's
environment; ``<site workspace>/<job id>/bsf_he_site/``, NumPy files that stay at the site): a check that the
decrypted global model is the FedAvg of the plaintext updates.

Needs TenSEAL (``pip install -e .[he]``); importing this module without it raises :class:`bsf.errors.ConfigError`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from bsf.errors import ConfigError

try:
    import tenseal as ts
except ImportError:  # pragma: no cover - exercised only without the extra
    raise ConfigError(
        "federation.encryption: he needs TenSEAL; install the extra: pip install -e '.[he]' (tenseal==0.3.18)"
    ) from None

from nvflare.apis.dxo import MetaKey
from nvflare.apis.fl_constant import FLContextKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.workflows.fedavg import FedAvg
from nvflare.app_opt.he import decomposers
from nvflare.app_opt.he.constant import HE_ALGORITHM_CKKS
from nvflare.app_opt.he.homomorphic_encrypt import load_tenseal_context_from_workspace
from nvflare.app_opt.he.model_decryptor import HEModelDecryptor
from nvflare.app_opt.he.model_encryptor import HEModelEncryptor
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor

from bsf.fl.aggregation import META_NUM_STEPS, MAX_CLAIM, CheckedFedAvgAggregator
from bsf.fl.controller import CheckedFedAvg
from bsf.fl.persistor import BSFModelPersistor
from bsf.federation.run_folders import ROUND_KEY

log = logging.getLogger(__name__)

SERVER_CONTEXT = "server_context.tenseal"  # nvflare.lighter.constants.ProvFileName.SERVER_CONTEXT_TENSEAL
CLIENT_CONTEXT = "client_context.tenseal"  # ... CLIENT_CONTEXT_TENSEAL
SERIALIZE_FILTER_ID = "he_serialize_filter"
HE_ROUNDS_FILE = "bsf_he_rounds.jsonl"
SITE_RECORD_ENV = "BSF_HE_SITE_RECORD"
SITE_RECORD_FOLDER = "bsf_he_site"
CIPHERTEXT = ts.CKKSVector


def is_ciphertext(value: Any) -> bool:
    return isinstance(value, CIPHERTEXT)


def he_meta(params: Mapping[str, Any]) -> dict[str, Any]:
    """The DXO meta NVFlare's decryptor needs: which keys are ciphertexts, and the scheme."""
    return {MetaKey.PROCESSED_KEYS: {k: is_ciphertext(v) for k, v in params.items()},
            MetaKey.PROCESSED_ALGORITHM: HE_ALGORITHM_CKKS}


def _run_dir(fl_ctx) -> Path:
    return Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))


def _site_record(fl_ctx, name: str, arrays: Mapping[str, np.ndarray], **scalars: Any) -> None:
    """With ``BSF_HE_SITE_RECORD=1``: keep ``arrays`` (and ``scalars``) at the site, ``bsf_he_site/<name>.npz``."""
    if os.environ.get(SITE_RECORD_ENV) != "1":
        return
    folder = _run_dir(fl_ctx) / SITE_RECORD_FOLDER
    folder.mkdir(exist_ok=True)
    np.savez(folder / f"{name}.npz", **{f"w:{k}": np.asarray(v) for k, v in arrays.items()},
             **{f"s:{k}": np.asarray(v) for k, v in scalars.items()})


def read_site_record(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The tensors and scalars of one ``bsf_he_site/*.npz`` record."""
    with np.load(path) as data:
        arrays = {k[2:]: data[k] for k in data.files if k.startswith("w:")}
        scalars = {k[2:]: data[k].item() for k in data.files if k.startswith("s:")}
    return arrays, scalars


# ------------------------------------------------------------------ the site
class SiteHEDecryptor(HEModelDecryptor):
    """NVFlare's decryptor, then each decrypted tensor (a flat list) back to the job model's shape, float32.

    Args:
        run_config: the job's run config in the app's ``config/`` folder (it defines the model's shapes).
    """

    def __init__(self, run_config: str = "bsf_run.yaml", tenseal_context_file: str = CLIENT_CONTEXT):
        super().__init__(tenseal_context_file=tenseal_context_file)
        self.run_config = run_config
        self._shapes: dict[str, tuple[int, ...]] | None = None

    def _model_shapes(self, fl_ctx) -> dict[str, tuple[int, ...]]:
        if self._shapes is None:
            from bsf.fl.deploy.privacy import model_shapes_from_run_config

            app_root = fl_ctx.get_prop(FLContextKey.APP_ROOT) or ""
            self._shapes = model_shapes_from_run_config(Path(app_root) / "config" / self.run_config)
        return self._shapes

    def process_dxo(self, dxo, shareable, fl_ctx):
        decrypted = super().process_dxo(dxo, shareable, fl_ctx)
        if decrypted is not None:
            shapes = self._model_shapes(fl_ctx)
            decrypted.data = {k: np.asarray(v, dtype=np.float32).reshape(shapes[k]) for k, v in decrypted.data.items()}
            decrypted.update_shareable(shareable)
        received = (decrypted or dxo).data
        _site_record(fl_ctx, f"received_r{shareable.get_header(AppConstants.CURRENT_ROUND, 0)}", received)
        return decrypted


class SiteHEEncryptor(HEModelEncryptor):
    """NVFlare's encryptor weighing by the site's step count (the server cannot scale per site); the job's last result filter."""

    def __init__(self, tenseal_context_file: str = CLIENT_CONTEXT):
        super().__init__(tenseal_context_file=tenseal_context_file, weigh_by_local_iter=True)

    def process_dxo(self, dxo, shareable, fl_ctx):
        round_ = shareable.get_header(AppConstants.CURRENT_ROUND, 0)
        _site_record(fl_ctx, f"update_r{round_}", dxo.data, steps=dxo.get_meta_prop(META_NUM_STEPS, 0), kind=str(dxo.data_kind))
        return super().process_dxo(dxo, shareable, fl_ctx)


# ------------------------------------------------------------------ the server
def _claim(meta: Mapping[str, Any], bound: int) -> int | None:
    value = meta.get(META_NUM_STEPS)
    return value if type(value) is int and 1 <= value <= bound else None


class HEFedAvgAggregator(CheckedFedAvgAggregator):
    """The checks the server can still make on ciphertexts, and their step-weighted sum.

    A result counts when it is CKKS-encrypted, holds exactly the global model's keys, each a ciphertext of
    that tensor's size, and claims a step count in ``[1, expected_steps]`` (the site scaled its update by
    that count before encrypting, so the claim cannot be clipped here: a claim out of bounds is rejected).
    Finite values, shapes and dtypes are the site's guard's to check (:mod:`bsf.fl.deploy.privacy`). No norm bound:
    the server cannot measure a ciphertext's norm; the round record's ``norm_bound`` entry and a warning say so.
    """

    sees_plaintext = False  # no norm bound (CheckedFedAvgAggregator) on ciphertexts

    def __init__(self, min_accepted: int = 1, expected_steps: int | None = None):
        super().__init__(weigh_by="steps", min_accepted=min_accepted, expected_steps=expected_steps)
        decomposers.register()
        self._sum: dict[str, Any] = {}
        self._weight = 0
        self.received: dict[str, dict[str, Any]] = {}  # site -> what arrived (types, the contexts' secret keys)

    def set_reference(self, global_params: Mapping[str, Any]) -> None:
        self._reference = {k: tuple(np.shape(v)) for k, v in global_params.items()}

    def reset_stats(self) -> None:
        super().reset_stats()
        self._sum, self._weight, self.received = {}, 0, {}

    def accept_model(self, model: FLModel) -> bool:
        meta = model.meta or {}
        site = str(meta.get("client_name", "unknown"))
        params = model.params or {}
        self.received[site] = {
            "types": sorted({type(v).__name__ for v in params.values()}),
            "context_has_secret_key": any(v.context().has_secret_key() for v in params.values() if is_ciphertext(v)),
        }
        if self._reference is None:
            return self.reject(site, "the server has no global model to check the update against")
        if meta.get(MetaKey.PROCESSED_ALGORITHM) != HE_ALGORITHM_CKKS or not all(map(is_ciphertext, params.values())):
            return self.reject(site, f"the update is not CKKS ciphertext (types {self.received[site]['types']}); "
                                     "an encrypted job aggregates ciphertexts only")
        if model.params_type not in (ParamsType.FULL, ParamsType.DIFF) or self._params_type not in (None, model.params_type):
            return self.reject(site, f"params type {model.params_type} (this round: {self._params_type})")
        if set(params) != set(self._reference):
            return self.reject(site, f"keys differ from the global model's: {len(set(self._reference) - set(params))} "
                                     f"missing, {len(set(params) - set(self._reference))} unknown")
        wrong = [k for k, v in params.items() if v.size() != int(np.prod(self._reference[k]))]
        if wrong:
            return self.reject(site, f"{len(wrong)} ciphertext(s) of the wrong size, e.g. {wrong[:3]}")
        steps = _claim(meta, self.expected_steps or MAX_CLAIM)
        if steps is None:
            return self.reject(site, f"step claim {meta.get(META_NUM_STEPS)!r} is not an int in [1, {self.expected_steps}] "
                                     "(the site scaled its ciphertext by it)")
        self._params_type = model.params_type
        self._sum = {k: v if k not in self._sum else self._sum[k] + v for k, v in params.items()}
        self._weight += steps
        self._mean.add({}, float(steps), site)  # the record's contributors and weights
        numeric = {k: float(v) for k, v in (model.metrics or {}).items() if type(v) in (int, float) and np.isfinite(v)}
        if numeric:
            self._metrics.add(numeric, float(steps), site)
        log.info("accepted the encrypted update from site %s (%d steps)", site, steps)
        return True

    def aggregate_model(self) -> FLModel:
        meta = self._round_meta()
        if len(meta["accepted_sites"]) < self.min_accepted:
            log.error("only %d acceptable update(s) (need %d); the global model stays unchanged this round",
                      len(meta["accepted_sites"]), self.min_accepted)
            result = FLModel(params={}, params_type=ParamsType.DIFF, meta={**meta, "round_skipped": True})
        else:
            params = {k: v * (1.0 / self._weight) for k, v in self._sum.items()}
            result = FLModel(params=params, params_type=self._params_type, meta={**meta, **he_meta(params)})
        metrics = {k: float(v) for k, v in self._metrics.result().items()}
        result.metrics = metrics or None
        result.meta["he_received"] = dict(self.received)
        self.reset_stats()
        return result


def _add(global_value: Any, diff: Any) -> Any:
    """Global tensor + aggregated ciphertext difference (a ciphertext; a plaintext global is flattened first)."""
    if is_ciphertext(global_value):
        return global_value + diff
    return diff + np.asarray(global_value, dtype=np.float64).ravel()


class HEFedAvg(CheckedFedAvg):
    """:class:`~bsf.fl.controller.CheckedFedAvg` on ciphertexts: needs an :class:`HEFedAvgAggregator`.

    The global model is updated in encrypted space (no finite check: the server cannot see the values; the
    sites' guards checked every update before encryption); the round record says what arrived as which type.
    """

    def __init__(self, *args, aggregator: HEFedAvgAggregator | None = None, **kwargs):
        if not isinstance(aggregator, HEFedAvgAggregator):
            raise TypeError(f"aggregator must be an HEFedAvgAggregator, got {type(aggregator).__name__}")
        super().__init__(*args, aggregator=aggregator, **kwargs)
        decomposers.register()
        self._server_context = None

    def _context_has_secret_key(self) -> bool:
        if self._server_context is None:
            self._server_context = load_tenseal_context_from_workspace(SERVER_CONTEXT, self.fl_ctx)
        return bool(self._server_context.has_secret_key())

    def send_model(self, task_name: str = "train", data: FLModel = None, **kwargs) -> None:
        """Send the global model with its ciphertexts serialized (NVFlare deep-copies task data per site, which a
        ciphertext without its secret key refuses; the sites' decryptor reads the bytes back)."""
        if data is not None and data.params:
            data = copy.copy(data)
            data.params = {k: v.serialize() if is_ciphertext(v) else v for k, v in data.params.items()}
        super().send_model(task_name=task_name, data=data, **kwargs)

    def update_model(self, model: FLModel, aggr_result: FLModel) -> FLModel:
        aggr_meta = dict(aggr_result.meta or {})
        received = aggr_meta.pop("he_received", {})
        params = dict(model.params or {})
        if aggr_result.params:
            if aggr_result.params_type == ParamsType.DIFF:
                params.update({k: _add(params[k], v) for k, v in aggr_result.params.items()})
            else:
                params.update(aggr_result.params)
        full = FLModel(params=params, params_type=ParamsType.FULL, metrics=aggr_result.metrics,
                       meta={**aggr_meta, **he_meta(params)})
        model = FedAvg.update_model(self, model, full)
        self._write_round_record(aggr_result, None)
        self._write_he_record(received, params)
        return model

    def _write_he_record(self, received: Mapping[str, Any], params: Mapping[str, Any]) -> None:
        record = {
            "round": self.current_round,
            "received": dict(received),
            "global_model_types": sorted({type(v).__name__ for v in params.values()}),
            "server_context_has_secret_key": self._context_has_secret_key(),
        }
        try:
            with open(os.path.join(self.get_run_dir(), HE_ROUNDS_FILE), "a") as handle:
                handle.write(json.dumps(record, sort_keys=True) + "\n")
        except OSError as exc:  # a report must never break the round
            self.warning(f"could not write {HE_ROUNDS_FILE}: {exc}")


class HEModelPersistor(BSFModelPersistor):
    """:class:`~bsf.fl.persistor.BSFModelPersistor` for a ciphertext global model.

    Saves through NVFlare's ``HEModelSerializeFilter`` (component ``he_serialize_filter``: ciphertexts as bytes
    in ``FL_global_model.pt``), without the finite check the server can no longer make.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.filter_id = SERIALIZE_FILTER_ID

    def save_model(self, ml, fl_ctx) -> None:
        self._get_persistence_manager(fl_ctx).other_props[ROUND_KEY] = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        PTFileModelPersistor.save_model(self, ml, fl_ctx)


# ------------------------------------------------------------------ the job and the lead
def add_he_components(job, run_config: str) -> None:
    """Add the HE filters to a ``BaseFedJob``: the server's serialize filter, the sites' decryptor and encryptor."""
    from nvflare.app_opt.he.model_serialize_filter import HEModelSerializeFilter
    from nvflare.job_config.defs import FilterType

    job.to_server(HEModelSerializeFilter(tenseal_context_file=SERVER_CONTEXT), id=SERIALIZE_FILTER_ID)
    job.to_clients(SiteHEDecryptor(run_config=run_config), tasks=["train", "validate"], filter_type=FilterType.TASK_DATA)
    job.to_clients(SiteHEEncryptor(), tasks=["train"], filter_type=FilterType.TASK_RESULT)


def decrypt_global_model(model_file: str | os.PathLike, client_context: str | os.PathLike,
                         shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """A persisted encrypted global model, decrypted with a site's ``client_context.tenseal`` (key -> float32 of ``shapes``).

    The file holds serialized ciphertexts (bytes) and plaintext tensors only, so it is read with
    ``weights_only=True`` (:func:`bsf.model.read_checkpoint`): a planted file cannot run code.
    """
    from bsf.errors import CheckpointError
    from bsf.model import read_checkpoint

    context = ts.context_from(Path(client_context).read_bytes())
    if not context.has_secret_key():
        raise ConfigError(f"{client_context}: this context has no secret key (a server's?); use a site's client context")
    loaded = read_checkpoint(model_file, "encrypted global model")
    if not isinstance(loaded, Mapping) or not isinstance(loaded.get("model"), Mapping):
        raise CheckpointError(f"encrypted global model {model_file}: no 'model' state in it")
    state = loaded["model"]
    out = {}
    for key, value in state.items():
        plain = ts.ckks_vector_from(context, value).decrypt() if isinstance(value, bytes) else value.numpy()
        out[key] = np.asarray(plain, dtype=np.float32).reshape(shapes[key])
    return out
