"""A stand-in for :class:`bsf.fl.deploy.poc.PocDeployment` in the POC runner's tests: nothing is provisioned or started.

It records the sites and site configurations it was made with (``made``) and whether it was started; every
submitted job 'completes' at once with a global model file that records round 0.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bsf.federation import run_folders


class FakePocDeployment:
    made: dict = {}
    started = False

    def __init__(self, out, sites=(), site_configs=None, **_):
        FakePocDeployment.made = {"sites": list(sites), "site_configs": dict(site_configs or {})}
        FakePocDeployment.started = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def start(self):
        FakePocDeployment.started = True

    def submit(self, job_folder):
        return Path(job_folder).name

    def wait(self, job_id, timeout):
        return "FINISHED:COMPLETED"

    def download(self, job_id, out):
        run_dir = Path(out) / job_id
        run_folders.global_model(run_dir).parent.mkdir(parents=True)
        torch.save({"model": {}, run_folders.ROUND_KEY: 0}, run_folders.global_model(run_dir))
        return run_dir
