"""The consortium lead's production path: a job states its schedule, and the best model may be the last one.

Fast tests: ``bsf jobs export`` prints the schedule it wrote and refuses a paper-size run config without one; the
loader refuses a warm-up at least as long as the schedule; the controller has the sites validate the last global
model and chooses the best among every validated global model, the last included (a controller driven with fake
sites), and the persistor writes the model the controller names. The guide's own commands on loopback (NVFlare's
CLI against a provisioned localhost project) are in the slow test at the end.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.workflows.fedavg import FedAvg

from bsf.cli import main as bsf_main
from bsf.config import load_config
from bsf.errors import ConfigError
from bsf.fl.aggregation import CheckedFedAvgAggregator
from bsf.federation.model_selection import ModelSelection
from bsf.federation.run_folders import SELECTION_FILE
from bsf.fl.controller import CheckedFedAvg
from tests.nvflare_fakes import site_context

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ 1. every exported job states its schedule
def test_export_prints_the_schedule_it_wrote(tmp_path, capsys):
    assert bsf_main(["jobs", "export", "--out", str(tmp_path), "--job", "stage1"]) == 0
    out = capsys.readouterr().out
    assert "3 rounds x 4 local steps = 12 steps per site, warm-up 5 steps" in out
    assert "run config stage1_test says train.steps 60, the job's schedule replaces it" in out
    assert bsf_main(["jobs", "export", "--out", str(tmp_path), "--job", "stage2_brats", "--run-config", "stage2_brats",
                     "--rounds", "250", "--local-steps", "200"]) == 0
    assert "250 rounds x 200 local steps = 50,000 steps per site, warm-up 500 steps" in capsys.readouterr().out
    config = load_config(tmp_path / "stage2_brats" / "app" / "config" / "bsf_run.yaml")
    assert (config.federation.rounds, config.federation.local_steps, config.train.steps) == (250, 200, 50_000)


@pytest.mark.parametrize("given", [[], ["--rounds", "250"]])
def test_a_paper_run_config_without_a_schedule_is_refused(tmp_path, capsys, given):
    """Step 6 of the guide as it was: the paper preset, no --rounds/--local-steps, so the test job's 3 x 4 (12 steps)
    with the paper's 500 warm-up steps. Now refused, naming what to give; nothing is written."""
    argv = ["jobs", "export", "--out", str(tmp_path), "--job", "stage2_brats", "--run-config", "stage2_brats", *given]
    assert bsf_main(argv) == 2
    err = capsys.readouterr().err
    assert "--local-steps" in err and "train.steps 50000" in err and "optim.warmup_steps 500" in err
    assert ("--rounds and --local-steps" in err) is (not given)
    assert "e.g. --rounds 250 --local-steps 200" in err and "federation.rounds" in err
    assert not (tmp_path / "stage2_brats").exists()


def test_a_run_config_may_carry_its_own_schedule(tmp_path, capsys):
    """A run config with a ``federation:`` section brings its rounds and local steps; the command line still wins."""
    raw = yaml.safe_load((REPO / "bsf" / "presets" / "stage1_ukb.yaml").read_text())
    raw["federation"] = {"rounds": 40, "local_steps": 50}
    own = tmp_path / "stage1_site.yaml"
    own.write_text(yaml.safe_dump(raw))
    assert bsf_main(["jobs", "export", "--out", str(tmp_path / "a"), "--job", "stage1", "--run-config", str(own)]) == 0
    assert "40 rounds x 50 local steps = 2,000 steps per site, warm-up 500 steps" in capsys.readouterr().out
    assert bsf_main(["jobs", "export", "--out", str(tmp_path / "b"), "--job", "stage1", "--run-config", str(own),
                     "--rounds", "20"]) == 0
    assert "20 rounds x 50 local steps = 1,000 steps per site" in capsys.readouterr().out
    # 5 x 50 = 250 steps: the preset's warm-up of 500 would be the whole run
    assert bsf_main(["jobs", "export", "--out", str(tmp_path / "c"), "--job", "stage1", "--run-config", str(own),
                     "--rounds", "5"]) == 2
    assert "optim.warmup_steps 500 is not shorter than the schedule, train.steps 250" in capsys.readouterr().err


def test_the_loader_refuses_a_warm_up_as_long_as_the_schedule():
    """Both keys are named: the warm-up and the schedule's length (in a federated run config: rounds x local steps)."""
    with pytest.raises(ConfigError, match=r"optim.warmup_steps 500 is not shorter than the schedule, train.steps 500"):
        load_config("stage2_brats", ["train.steps=500"])
    with pytest.raises(ConfigError, match=r"optim.warmup_steps 500 .* optim.total_steps 100"):
        load_config("stage2_brats", ["optim.total_steps=100"])
    assert load_config("stage2_brats", ["train.steps=501"]).optim.warmup_steps == 500
    assert load_config("stage1_test", ["train.steps=2"]).train.steps == 2  # a smoke test of a few steps: not checked
    from bsf.fl.jobs import COMMITTED_JOBS, job_run_config

    spec = replace(COMMITTED_JOBS["stage2_brats"], run_config="stage2_brats").with_federation(rounds=3, local_steps=4)
    with pytest.raises(ConfigError, match=r"job stage2_brats .*optim.warmup_steps 500 .*train.steps 12 "
                                          r"\(= federation.rounds 3 x federation.local_steps 4\)"):
        job_run_config(spec)


# ------------------------------------------------------------------ 2. the last global model can be the best
def test_model_selection_by_hand():
    higher = ModelSelection("val_dice_mean")
    assert higher.offer(0, {"a": 0.2, "b": 0.4}, "round 1")
    assert not higher.offer(1, {"a": 0.3, "b": 0.3}, "round 2")  # a tie keeps the earlier model
    assert not higher.offer(2, {"a": float("nan")}, "round 3")  # nothing finite: never the best
    assert higher.offer(3, {"a": 0.5, "b": 0.2, "c": 0.5}, "after the last round")
    record = higher.to_dict(last_round=3)
    assert record["best_model_round"] == 3 and record["best_is_last"] and record["last_model_validated"]
    assert record["best"]["value"] == pytest.approx(0.4) and record["candidates"][2]["value"] is None
    lower = ModelSelection("val_reconstruction_l1", lower_is_better=True)
    assert lower.offer(0, {"a": 0.5}, "round 1") and lower.offer(1, {"a": 0.4}, "round 2")
    assert not lower.offer(2, {"a": 0.45}, "after the last round")
    assert lower.to_dict(last_round=2)["best_model_round"] == 1 and not lower.to_dict(last_round=2)["best_is_last"]


class _Persistor:
    """Stands in for BSFModelPersistor: keeps what was saved as the global model and what it would write as the best."""

    def __init__(self, controller):
        self.controller = controller
        self.saved: list[float] = []
        self.best: list[float] = []

    def save(self, ml, fl_ctx):
        self.saved.append(float(ml["weights"]["swinViT.a"][0]))

    def handle_best(self):  # PTFileModelPersistor: on GLOBAL_BEST_MODEL_AVAILABLE, write the context's GLOBAL_MODEL
        ml = self.controller.fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        self.best.append(float(ml["weights"]["swinViT.a"][0]))


def _run_controller(tmp_path: Path, metric, rounds: int = 3, lower_is_better: bool = False, validate_final: bool = True,
                    failing_site: str | None = None):
    """A CheckedFedAvg run of ``rounds`` rounds with two fake sites. Each site adds 1 to the global value ``w`` per
    round and reports ``metric(w, site)`` for the model it received (with its update, and for the validate task)."""
    controller = CheckedFedAvg(num_rounds=rounds, persistor_id="persistor", key_metric="m", lower_is_better=lower_is_better,
                               validate_final=validate_final,
                               aggregator=CheckedFedAvgAggregator(expected_steps=4, min_accepted=1))
    controller.fl_ctx = site_context(tmp_path)
    controller.abort_signal = Signal()
    controller.get_run_dir = lambda: str(tmp_path)
    controller.sample_clients = lambda num_clients=None: ["site-1", "site-2"]
    controller.get_num_standing_tasks = lambda: 0
    persistor = controller.persistor = _Persistor(controller)
    events = []

    def event(event_type):
        events.append(event_type)
        if event_type == AppEventType.GLOBAL_BEST_MODEL_AVAILABLE:
            persistor.handle_best()

    controller.event = event
    tasks = []

    def broadcast_model(task_name, data, targets, callback, **_):
        w = float(data.params["swinViT.a"][0])
        tasks.append((task_name, w))
        for site in targets:
            meta = {"client_name": site}
            if task_name == "validate":
                if site == failing_site:
                    continue
                callback(FLModel(metrics={"m": metric(w, site)}, meta=meta))
            else:
                meta["NUM_STEPS_CURRENT_ROUND"] = 4
                callback(FLModel(params={"swinViT.a": np.ones(2, np.float32)}, params_type=ParamsType.DIFF,
                                 metrics={"m": metric(w, site), "train_loss": 1.0}, meta=meta))

    controller.broadcast_model = broadcast_model
    initial = FLModel(params={"swinViT.a": np.zeros(2, np.float32)}, params_type=ParamsType.FULL)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FedAvg, "load_model", lambda self: initial)
        controller.run()
    return tasks, persistor, json.loads((tmp_path / SELECTION_FILE).read_text())


def test_the_last_global_model_is_validated_and_can_be_the_best(tmp_path):
    """Validation improves every round: the model after the last round (w = 3) is validated at every site after the
    last round and becomes best_FL_global_model; NVFlare's selector could only pick w = 2 (validated in round 2)."""
    tasks, persistor, record = _run_controller(tmp_path, metric=lambda w, site: w / 10)
    assert tasks == [("train", 0.0), ("train", 1.0), ("train", 2.0), ("validate", 3.0)]
    assert persistor.saved == [1.0, 2.0, 3.0]
    assert persistor.best == [1.0, 2.0, 3.0]  # each new best was the model the sites had just validated
    assert [c["model_round"] for c in record["candidates"]] == [0, 1, 2]  # round 0's initial model: no candidate
    assert [c["validated"] for c in record["candidates"]] == ["round 1", "round 2", "after the last round"]
    assert record["best_model_round"] == 2 == record["last_round"] and record["best_is_last"]
    assert record["best"]["sites"] == {"site-1": pytest.approx(0.3), "site-2": pytest.approx(0.3)}


def test_an_earlier_model_stays_best_when_the_last_is_worse(tmp_path):
    """Lower is better and the loss rises after the first aggregate: the model after round 0 stays the best."""
    tasks, persistor, record = _run_controller(tmp_path, metric=lambda w, site: abs(w - 1.2), lower_is_better=True)
    assert tasks[-1] == ("validate", 3.0)
    assert persistor.best == [1.0]
    assert record["best_model_round"] == 0 and not record["best_is_last"] and record["last_model_validated"]
    assert record["candidates"][-1]["value"] == pytest.approx(1.8)


def test_a_site_that_cannot_validate_the_last_model_leaves_the_others(tmp_path):
    """site-1 answers the last validation with an error: logged, the candidate is site-2's value alone."""
    _, persistor, record = _run_controller(tmp_path, metric=lambda w, site: w + 5 * (site == "site-1"),
                                           failing_site="site-1")
    assert record["candidates"][-1]["sites"] == {"site-2": pytest.approx(3.0)}
    assert persistor.best == [1.0, 2.0]  # site-2 alone: 3.0 is not above round 2's mean (7 + 2) / 2 = 4.5


def test_without_the_last_validation_the_last_model_is_no_candidate(tmp_path):
    tasks, persistor, record = _run_controller(tmp_path, metric=lambda w, site: w, validate_final=False)
    assert [t for t, _ in tasks] == ["train"] * 3
    assert record["best_model_round"] == 1 and not record["last_model_validated"] and not record["best_is_last"]


def test_the_persistor_writes_the_model_in_the_context_as_the_best(tmp_path):
    """The other half of the wiring: BSFModelPersistor, on GLOBAL_BEST_MODEL_AVAILABLE, writes the global model the
    controller last set in the context (after the last round: the last model) to best_FL_global_model.pt."""
    from nvflare.app_common.abstract.model import make_model_learnable
    from nvflare.app_opt.pt.model_persistence_format_manager import PTModelPersistenceFormatManager

    from bsf.fl.persistor import BSFModelPersistor

    persistor = BSFModelPersistor()
    persistor._best_ckpt_save_path = str(tmp_path / "best_FL_global_model.pt")
    persistor.persistence_manager = PTModelPersistenceFormatManager({"swinViT.a": torch.zeros(2)}, allow_numpy_conversion=True)
    ctx = site_context(tmp_path)
    ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable({"swinViT.a": np.full(2, 3.0, np.float32)}, {}),
                 private=True, sticky=True)
    persistor.handle_event(AppEventType.GLOBAL_BEST_MODEL_AVAILABLE, ctx)
    saved = torch.load(tmp_path / "best_FL_global_model.pt", weights_only=False)
    assert torch.equal(torch.as_tensor(saved["model"]["swinViT.a"]), torch.full((2,), 3.0))


def test_committed_jobs_choose_the_best_model_in_the_controller():
    """No NVFlare IntimeModelSelector (it never sees the last model): the controller has the key metric."""
    for job in ("stage1", "stage3_brats"):
        server = json.loads((REPO / "jobs" / job / "app" / "config" / "config_fed_server.json").read_text())
        assert not any("IntimeModelSelector" in c["path"] for c in server["components"])
        fedavg = next(w for w in server["workflows"] if w["id"] == "fedavg")["args"]
        assert fedavg["key_metric"] == ("val_reconstruction_l1" if job == "stage1" else "val_dice_mean")
        assert fedavg.get("lower_is_better", False) is (job == "stage1")


def test_an_error_reply_to_the_last_validation_only_logs(tmp_path, caplog):
    """A site that fails the last validation neither counts as a rejected update nor stops the job."""
    from nvflare.apis.fl_constant import ReturnCode
    from nvflare.apis.shareable import make_reply

    aggregator = CheckedFedAvgAggregator(expected_steps=4, min_accepted=2)
    controller = CheckedFedAvg(num_rounds=1, persistor_id="persistor", key_metric="m", aggregator=aggregator)
    controller.fl_ctx = site_context(tmp_path)
    controller._current_num_targets, controller._final_validation = 2, True
    panics = []
    controller.panic = panics.append
    with caplog.at_level("WARNING"):
        assert controller._accept_train_result("site-1", make_reply(ReturnCode.EXECUTION_EXCEPTION), controller.fl_ctx) is False
    assert not panics and not aggregator.rejected
    assert "site-1 could not validate the last global model" in caplog.text


def test_the_cross_site_table_says_which_global_model_is_the_best(tmp_path):
    from bsf.fl.crosssite import write_cross_site_table

    selection = ModelSelection("val_dice_mean")
    selection.offer(0, {"site-1": 0.2}, "round 1")
    selection.offer(1, {"site-1": 0.3}, "after the last round")
    (tmp_path / SELECTION_FILE).write_text(json.dumps(selection.to_dict(last_round=1)))
    (tmp_path / "cross_site_val").mkdir()
    (tmp_path / "cross_site_val" / "cross_val_results.json").write_text(json.dumps(
        {"site-1": {"SRV_FL_global_model.pt": {"val_dice_mean": 0.3}, "SRV_best_FL_global_model.pt": {"val_dice_mean": 0.3}}}))
    json_path, md_path = write_cross_site_table(tmp_path)
    assert json.loads(json_path.read_text())["selection"]["best_model_round"] == 1
    assert ("Best global model: the model after round 1, mean val_dice_mean 0.3000 over 1 site(s), validated after "
            "the last round: the last global model.") in md_path.read_text()


# ------------------------------------------------------------------ the guide's commands on loopback
NVFLARE = str(Path(sys.executable).with_name("nvflare"))
LEAD_NAME = "lead@bsf-consortium.org"
SITES = {"ukb-site": "ukb", "brats-site-a": "brats"}


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def localhost_project(template: Path, sites: dict[str, str]) -> dict:
    """The guide's "rehearse on one host" copy of provisioning/project.yml: the server is ``localhost`` on free ports,
    only ``sites`` take part; builders, admin and site policies stay as they are (GPUs: each site's kit step)."""
    project = yaml.safe_load(template.read_text())
    kept = []
    for participant in project["participants"]:
        if participant["type"] == "server":
            participant["name"] = "localhost"
            participant["fed_learn_port"], participant["admin_port"] = _free_ports(2)
        if participant["type"] == "client" and participant["name"] not in sites:
            continue
        kept.append(participant)
    project["participants"] = kept
    return project


def rehearsal_site_config(template: Path, root: Path, datalist: Path) -> dict:
    """A site config for this host: the template's with local paths, no cache folder, no worker processes, CPU, fp32;
    BraTS: no fold (a few synthetic cases do not hold the official split's fold 0), data.val_cases instead."""
    config = yaml.safe_load(template.read_text())
    config["data"].update(root=str(root), datalist=str(datalist), cache="none", cache_dir="", num_workers=0, check="header")
    if config["data"]["dataset"] == "brats":
        config["data"]["fold"] = None
    config["train"] = {"device": "cpu", "precision": "fp32"}
    return config


@pytest.mark.slow
def test_the_guide_on_one_host(tmp_path, capsys):
    """docs/lead.md, rehearsed as its "Rehearse the steps on one host" section says: a localhost copy of the project,
    CPU kits through the site admin's ``bsf deploy site-kit --gpus 0``, synthetic data indexed with the small-data
    options, then NVFlare's own CLI with the lead's kit: status (server first, sites after), submit, monitor,
    download, Stage 1 -> Stage 2 BraTS from the last global model, shutdown with ``--force``. Nothing may outlive it.
    The ``bsf`` commands run in this process (``bsf.cli.main``, the same parser), NVFlare's as the processes they are."""
    from bsf.fl.deploy.processes import kill_under, processes_under

    env = {**os.environ, "HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    env.pop("BSF_SITE_CONFIG", None)
    env.pop("BSF_PRETRAINED", None)
    (tmp_path / "home").mkdir()

    def bsf(*args: str) -> str:
        capsys.readouterr()
        code = bsf_main(list(args))
        out, err = capsys.readouterr()
        assert code == 0, f"bsf {' '.join(args)}: exit {code}\n{err[-3000:]}"
        return out

    def run(*args: str, cwd: Path = tmp_path, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        if check:
            assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{(proc.stdout + proc.stderr)[-3000:]}"
        return proc

    project = tmp_path / "project_localhost.yml"
    project.write_text(yaml.safe_dump(localhost_project(REPO / "provisioning" / "project.yml", SITES), sort_keys=False))
    prod = tmp_path / "workspace" / "brainsegfounder" / "prod_00"
    lead = str(prod / LEAD_NAME)

    def admin(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        return run(NVFLARE, *args, "--startup-kit", lead, check=check, timeout=timeout)

    try:
        # the data, indexed with the small-data options, and each site admin's kit step (CPU: --gpus 0)
        for site, dataset in SITES.items():
            data = tmp_path / "data" / dataset
            bsf("data", "synth", "--dataset", dataset, "--subjects", "3", "--out", str(data), "--spacing", "3")
            datalist = data / "datalist.json"
            index = ["data", "index", "--dataset", dataset, "--root", str(data), "--out", str(datalist)]
            if dataset == "ukb":  # 3 mm volumes have 61 slices, below the paper's 100: lower the rule
                assert bsf_main(index) == 2 and ">= 100 slices" in capsys.readouterr().err
                index += ["--min-slices", "50", "--val-count", "1"]
            bsf(*index)
            site_yaml = tmp_path / f"{site}.yaml"
            site_yaml.write_text(yaml.safe_dump(rehearsal_site_config(REPO / "sites" / f"{dataset}.yaml", data, datalist)))
            # 1. provision (once, before the first site's kit step)
            if not prod.is_dir():
                run(NVFLARE, "provision", "-p", str(project), "-w", str(tmp_path / "workspace"), cwd=REPO)
            bsf("deploy", "site-kit", str(prod / site), "--site-config", str(site_yaml), "--gpus", "0")

        # 2. the server first: it answers for itself; the whole system only once a site is connected
        subprocess.Popen([str(prod / "localhost" / "startup" / "start.sh")], cwd=tmp_path, env=env, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while (status := admin("system", "status", "server", check=False)).returncode != 0:
            assert time.monotonic() < deadline, status.stdout + status.stderr
            time.sleep(2)
        assert "Engine status: stopped" in status.stdout
        early = admin("system", "status", check=False)
        assert early.returncode == 2 and "not ready" in early.stdout + early.stderr
        for site in SITES:
            subprocess.Popen([str(prod / site / "startup" / "start.sh")], cwd=tmp_path, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 180
        while f"Registered clients: {len(SITES)}" not in (status := admin("system", "status", check=False)).stdout:
            assert time.monotonic() < deadline, status.stdout + status.stderr
            time.sleep(2)
        assert all(f"{site} " in status.stdout for site in SITES) and "no_jobs" in status.stdout
        for site in SITES:
            assert "Successfully registered client" in (prod / site / "log.txt").read_text()

        def stage(job: str, site: str, *options: str) -> Path:
            """3.-5.: export (the schedule printed), target, submit, monitor, download; the server's run folder."""
            jobs = tmp_path / "jobs_prod"
            out = bsf("jobs", "export", "--out", str(jobs), "--job", job, "--min-clients", "1",
                      "--override", "data.crops_per_volume=1", *options)
            assert " x 1 local step = " in out and "warm-up" in out, out
            bsf("deploy", "target", str(jobs / job), "--sites", site)
            submitted = admin("job", "submit", "-j", str(jobs / job)).stdout
            job_id = submitted.split("job_id:")[1].split()[0]
            assert job_id in admin("job", "list").stdout
            assert "FINISHED:COMPLETED" in admin("job", "monitor", job_id, timeout=600).stdout
            admin("job", "download", job_id, "-o", "results")
            return tmp_path / "results" / job_id / "workspace"

        def check_selection(run_dir: Path) -> dict:
            """The last global model was validated; best_FL_global_model.pt is the model the record names."""
            selection = json.loads((run_dir / SELECTION_FILE).read_text())
            assert selection["last_model_validated"] and selection["best"] is not None, selection
            best = torch.load(run_dir / "app_server" / "best_FL_global_model.pt", weights_only=False)
            assert best["bsf_round"] == selection["best_model_round"]
            return selection

        s1 = stage("stage1", "ukb-site", "--rounds", "2", "--local-steps", "1")
        selection = check_selection(s1)
        assert [c["validated"] for c in selection["candidates"]] == ["round 1", "after the last round"]
        assert "Best global model: the model after round" in (s1 / "cross_site_val" / "cross_site_table.md").read_text()

        # 6. the next stage starts from the last global model of the previous one (a path on the server host)
        stage1_model = s1 / "app_server" / "FL_global_model.pt"
        s2 = stage("stage2_brats", "brats-site-a", "--rounds", "2", "--local-steps", "1", "--no-cross-site-eval",
                   "--pretrained", str(stage1_model))
        check_selection(s2)
        server_log = (s2 / "log.txt").read_text()
        assert "initial global model" in server_log and str(stage1_model) in server_log

        # 7. stop: a script needs --force (no terminal to ask); a site alone, then everything
        refused = admin("system", "shutdown", "all", check=False)
        assert refused.returncode == 4 and "--force" in refused.stdout + refused.stderr
        admin("system", "shutdown", "client", "brats-site-a", "--force")
        admin("system", "shutdown", "all", "--force")
        deadline = time.monotonic() + 90
        while processes_under(tmp_path / "workspace"):
            assert time.monotonic() < deadline, f"still running: {processes_under(tmp_path / 'workspace')}"
            time.sleep(1)
    finally:
        kill_under(tmp_path / "workspace")
