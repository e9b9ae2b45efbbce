"""A slow site link: NVFlare's byte-streaming timeouts derived from the link speed, written into every kit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bsf.errors import ConfigError
from bsf.federation import payload
from bsf.federation.payload import streaming_timeouts
from bsf.fl.deploy.kit import write_comm_config

REPO = Path(__file__).resolve().parents[1]
NVFLARE = str(Path(sys.executable).with_name("nvflare"))
BUILDER = "bsf.fl.deploy.builder.BSFKitBuilder"


def test_10_mbit_link_by_hand():
    # 64 MiB window + 1 MiB chunk + 16 MiB ack interval = 84,934,656 bytes = 679,477,248 bits: 67.95 s at 10^7 bit/s;
    # x2 margin = 135.9 s, rounded up: 136 s
    t = streaming_timeouts(10)
    assert t.in_flight_seconds == pytest.approx(67.9477248)
    assert t.comm_config() == {
        "streaming_retry_wait": 136.0, "streaming_retry_timeout": 136.0, "streaming_ack_progress_timeout": 136.0,
        "streaming_ack_wait": 300, "streaming_read_timeout": 300,
    }


def test_fast_links_keep_nvflare_defaults():
    # 100 Mbit/s: 6.79 s in flight, x2 = 13.6 -> 14 s retry wait (above NVFlare's 5 s); all else at the defaults
    assert streaming_timeouts(100).comm_config() == {
        "streaming_retry_wait": 14.0, "streaming_retry_timeout": 60.0, "streaming_ack_progress_timeout": 60.0,
        "streaming_ack_wait": 300, "streaming_read_timeout": 300,
    }
    assert streaming_timeouts(1000).comm_config()["streaming_retry_wait"] == 5.0
    # 2 Mbit/s: 339.7 s in flight -> 680 s; the reader outwaits the sender's whole retry window (680 + 680 s)
    slow = streaming_timeouts(2)
    assert (slow.retry_wait, slow.ack_wait, slow.read_timeout) == (680.0, 680, 1360)


def test_the_derivation_assumes_the_installed_nvflare():
    from nvflare.fuel.f3.streaming import byte_receiver, byte_streamer, stream_const

    assert payload.STREAM_CHUNK_BYTES == stream_const.STREAM_CHUNK_SIZE
    assert payload.STREAM_WINDOW_BYTES == stream_const.STREAM_WINDOW_SIZE
    assert payload.STREAM_ACK_INTERVAL_BYTES == stream_const.STREAM_ACK_INTERVAL
    assert (payload.MIN_RETRY_WAIT, payload.MIN_RETRY_TIMEOUT, payload.MIN_ACK_WAIT) == (
        byte_streamer.STREAM_RETRY_WAIT, byte_streamer.STREAM_RETRY_TIMEOUT, byte_streamer.STREAM_ACK_WAIT)
    assert payload.MIN_READ_TIMEOUT == byte_receiver.READ_TIMEOUT
    assert payload.MAX_RETRY_WINDOW == byte_receiver.MAX_COMPLETED_TASK_TTL


@pytest.mark.parametrize("mbit", [0.5, 0, -1])
def test_unusable_link_is_refused_naming_the_setting(mbit):
    with pytest.raises(ConfigError, match="uplink_mbit"):
        streaming_timeouts(mbit)


def test_comm_config_keeps_the_kits_other_settings(tmp_path):
    (tmp_path / "comm_config.json").write_text(json.dumps({"max_message_size": 2 ** 31, "streaming_retry_wait": 1}))
    written = json.loads(write_comm_config(tmp_path, 10).read_text())
    assert written == {"max_message_size": 2 ** 31, **streaming_timeouts(10).comm_config()}


def test_poc_option_reaches_the_builder_and_the_jobs():
    from bsf.fl.deploy.poc import poc_project
    from bsf.pipeline.poc_run import plan_jobs

    project = poc_project(yaml.safe_load((REPO / "provisioning" / "project.yml").read_text()), ["site-1"],
                          (1, 2), uplink_mbit=10)
    assert next(b for b in project["builders"] if b["path"] == BUILDER)["args"]["uplink_mbit"] == 10
    specs = plan_jobs(["stage1", "stage3_brats"], ["site-1"], uplink_mbit=10)
    assert [spec.federation.uplink_mbit for spec, _sites in specs] == [10, 10]


def test_kits_provisioned_for_a_10_mbit_link(tmp_path):
    """The consortium's project.yml with ``uplink_mbit: 10``: the server's and every site's kit hold the derived
    settings, and NVFlare's own reader finds them in the kit, as its server/client/job processes do."""
    project = yaml.safe_load((REPO / "provisioning" / "project.yml").read_text())
    next(b for b in project["builders"] if b["path"] == BUILDER)["args"]["uplink_mbit"] = 10
    project_file = tmp_path / "project.yml"
    project_file.write_text(yaml.safe_dump(project, sort_keys=False))
    proc = subprocess.run([NVFLARE, "provision", "-p", str(project_file), "-w", str(tmp_path / "ws")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    prod = tmp_path / "ws" / project["name"] / "prod_00"
    expected = streaming_timeouts(10).comm_config()
    participants = [p["name"] for p in project["participants"] if p["type"] in ("server", "client")]
    for name in participants:
        assert json.loads((prod / name / "local" / "comm_config.json").read_text()) == expected, name
    read = (
        "import sys\n"
        "from nvflare.fuel.utils.config_service import ConfigService\n"
        "from nvflare.fuel.f3.comm_config import CommConfigurator\n"
        "ConfigService.initialize(section_files={}, config_path=[sys.argv[1]])\n"
        "c = CommConfigurator()\n"
        "print(c.get_streaming_retry_wait(5.0), c.get_streaming_retry_timeout(60.0), "
        "c.get_streaming_ack_progress_timeout(60.0))\n"
    )
    out = subprocess.run([sys.executable, "-c", read, str(prod / participants[1])], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["136.0", "136.0", "136.0"]


def test_lead_wait_outlasts_an_unanswered_status_poll(tmp_path, monkeypatch):
    """A server busy relaying models over slow links may leave an admin command unanswered past NVFlare's 5 s;
    the lead's wait asks again instead of ending, and gives up only after ``unanswered_s`` without any answer."""
    from nvflare.fuel.flare_api.api_spec import NoConnection

    from bsf.fl.deploy import poc as poc_module

    monkeypatch.setattr(poc_module.time, "sleep", lambda _s: None)
    answers = iter([NoConnection("ERROR_SERVER_CONNECTION"), "RUNNING", NoConnection("ERROR_SERVER_CONNECTION"),
                    "FINISHED:COMPLETED"])

    def status(job_id):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    deployment = poc_module.PocDeployment(tmp_path)
    monkeypatch.setattr(deployment, "status", status)
    assert deployment.wait("job-1", timeout=60) == "FINISHED:COMPLETED"

    monkeypatch.setattr(deployment, "status", lambda job_id: (_ for _ in ()).throw(NoConnection("gone")))
    with pytest.raises(NoConnection):
        deployment.wait("job-1", timeout=60, unanswered_s=0)
