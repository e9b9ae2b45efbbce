"""``bsf deploy ...``: a site's kit, the local POC run, and resuming a job whose server stopped.

::

    bsf deploy site-kit KIT --site-config sites/ukb.yaml [--gpus 1 --gpu-mem 40] [--privacy none|percentile|svt]
    bsf deploy poc --out poc_out [--stages stage1 stage2_brats stage3_brats] [--sites 2] [--rounds R --local-steps K] [--encryption he] [--uplink-mbit 10]
    bsf deploy poc --out poc_het --sites ukb=1,brats=2,atlas=1 --stages stage1 stage2_all stage3_brats stage3_atlas
    bsf deploy resume --job stage1 --server-run SERVER_WS/JOB_ID --out jobs_resume [--rounds R --local-steps K]
    bsf deploy target JOB_FOLDER --sites brats-site-a brats-site-b

Provisioning itself is NVFlare's: ``nvflare provision -p provisioning/project.yml -w workspace``.
"""

from __future__ import annotations

import argparse
import json


def cmd_site_kit(args: argparse.Namespace) -> None:
    from bsf.fl.deploy.kit import prepare_site_kit

    written = prepare_site_kit(args.kit, args.site_config, args.gpus, args.gpu_mem, args.privacy)
    for path in written:
        print(f"wrote {path}")
    print(f"next: bsf data check / bsf site check on {written[-1]}, then {args.kit}/startup/start.sh")


def cmd_poc(args: argparse.Namespace) -> None:
    from bsf.pipeline.poc_run import run_poc

    summary = run_poc(
        args.out, stages=args.stages, sites=args.sites, num_rounds=args.rounds, local_steps=args.local_steps,
        overrides=args.override or (), cross_site_eval=False if args.no_cross_site_eval else None,
        timeout=args.timeout, encryption=args.encryption, uplink_mbit=args.uplink_mbit,
    )
    for stage, entry in summary["stages"].items():
        print(f"{stage}: {entry['status']}, {entry['rounds']} rounds, global model {entry.get('global_model')}")
        print(f"  last round's metrics: {json.dumps(entry['last_metrics'])}")
        print(f"  TensorBoard: tensorboard --logdir {entry['run_dir']}/tb_events")
    print(f"summary: {args.out}/poc_summary.json")


def cmd_resume(args: argparse.Namespace) -> None:
    from bsf.pipeline.resume import export_resume_job
    from bsf.fl.jobs import COMMITTED_JOBS

    changes = {k: v for k, v in (("rounds", args.rounds), ("local_steps", args.local_steps)) if v is not None}
    spec = COMMITTED_JOBS[args.job].with_federation(**changes)
    job, start = export_resume_job(spec, args.server_run, args.out)
    print(f"wrote {job}: rounds {start}..{spec.federation.rounds - 1} from the last global model")
    print(f"submit it: nvflare job submit -j {job}   (or the admin API's submit_job)")


def cmd_target(args: argparse.Namespace) -> None:
    from bsf.fl.deploy.targets import target_sites

    meta = target_sites(args.job, args.sites)
    print(f"{args.job}: deploy_map {meta['deploy_map']}, min_clients {meta.get('min_clients')}")


def add_deploy_parser(sub) -> None:
    """Add ``bsf deploy`` and its subcommands to the ``bsf`` parser's subparsers ``sub``."""
    from bsf.config import ENCRYPTIONS
    from bsf.fl.deploy.policies import DP_CHOICES
    from bsf.fl.jobs import COMMITTED_JOBS
    from bsf.pipeline.sites import site_option

    deploy = sub.add_parser("deploy", help="real NVFlare deployments: site kits, a local POC run, resuming").add_subparsers(
        dest="deploy_command", required=True
    )
    kit = deploy.add_parser("site-kit", help="make a received startup kit this project's site, with its data configuration")
    kit.add_argument("kit", help="the site's startup kit folder (holds startup/ and local/)")
    kit.add_argument("--site-config", required=True, help="the site's data configuration, e.g. sites/ukb.yaml")
    kit.add_argument("--gpus", type=int, default=0, help="GPUs offered to jobs (0: CPU only)")
    kit.add_argument("--gpu-mem", type=float, default=0, help="memory per GPU in GiB")
    kit.add_argument("--privacy", choices=DP_CHOICES, default="none", help="differential-privacy filter before the result guard")
    kit.set_defaults(func=cmd_site_kit)

    poc = deploy.add_parser("poc", help="provision, start, run the stage jobs, collect models and metrics, stop (all local)")
    poc.add_argument("--out", required=True, help="folder for kits, workspaces, results and models")
    poc.add_argument("--stages", nargs="+", default=["stage1", "stage2_brats", "stage3_brats"], choices=sorted(COMMITTED_JOBS))
    poc.add_argument("--sites", type=site_option, default=site_option("2"),
                     help="N local sites (each runs every stage), or sites per data set, e.g. ukb=1,brats=2,atlas=1 "
                     "(each runs the stages of its data set); they synthesise their data")
    poc.add_argument("--rounds", type=int, default=None, help="rounds per stage (default: the job's)")
    poc.add_argument("--local-steps", type=int, default=None, help="steps per round (default: the job's)")
    poc.add_argument("--override", action="append", help="run-config override for every stage, section.key=value")
    poc.add_argument("--no-cross-site-eval", action="store_true")
    poc.add_argument("--encryption", choices=ENCRYPTIONS, default=None,
                     help="he: homomorphic encryption of every stage's updates (TenSEAL contexts in the kits; no cross-site eval)")
    poc.add_argument("--uplink-mbit", type=float, default=None,
                     help="the sites' link (Mbit/s): the jobs' federation.uplink_mbit (task timeouts) and every kit's "
                     "comm_config.json (NVFlare's streaming timeouts); default: NVFlare's defaults")
    poc.add_argument("--timeout", type=float, default=3600, help="seconds to wait for each job")
    poc.set_defaults(func=cmd_poc)

    resume = deploy.add_parser("resume", help="export a job that continues a stopped one from its last global model")
    resume.add_argument("--job", required=True, choices=sorted(COMMITTED_JOBS), help="the stopped job's stage")
    resume.add_argument("--server-run", required=True, help="the stopped job's folder on the server: <server workspace>/<job id>")
    resume.add_argument("--out", required=True, help="folder that receives the resume job")
    resume.add_argument("--rounds", type=int, default=None, help="the stopped job's rounds, if not the committed job's")
    resume.add_argument("--local-steps", type=int, default=None, help="the stopped job's local steps, if not the committed job's")
    resume.set_defaults(func=cmd_resume)

    target = deploy.add_parser("target", help="run an exported job only at the named sites (and the server)")
    target.add_argument("job", help="an exported job folder (holds meta.json)")
    target.add_argument("--sites", nargs="+", required=True, help="site names as provisioned, e.g. ukb-site")
    target.set_defaults(func=cmd_target)
