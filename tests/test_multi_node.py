"""accelerate_configs/multi_node.yaml run as two machines on one host: two `accelerate launch`
processes, one per machine rank, one training process each, meeting at 127.0.0.1 over gloo.

The launch takes the shipped config's DeepSpeed settings (ZeRO-3, zero.Init, 16-bit saves, the
`standard` multi-node launcher: torch's rendezvous rather than pdsh) and, as its header says to,
the machine rank, main process address and port from the command line. The run must equal one
process stepping on the whole batch (tests/launching.py), to the float32 tolerance of the other
distributed tests, with every parameter partitioned across the two machines; it runs in float32
(not the config's bf16) so that the comparison is that tight: the bf16 ZeRO-3 path is
tests/test_zero3.py's.
"""

from __future__ import annotations

import json
import socket
import subprocess

import deepspeed  # noqa: F401  (required: a missing install fails the suite, never skips it)
import pytest
import yaml
from launching import (
    LR,
    QUERIES,
    REPO,
    STEPS,
    assert_moved,
    assert_same_weights,
    env,
    launcher,
    reference_train_step,
    sharding_reports,
    train_args,
    weights,
    zero_config,
)
from synthetic import save_base, write_groups

pytestmark = [pytest.mark.distributed]

SHIPPED = yaml.safe_load((REPO / "accelerate_configs" / "multi_node.yaml").read_text())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_shipped_config_is_a_multi_node_zero3_launch():
    assert SHIPPED["num_machines"] > 1 and SHIPPED["distributed_type"] == "DEEPSPEED"
    assert SHIPPED["deepspeed_config"]["zero_stage"] == 3
    assert SHIPPED["deepspeed_config"]["deepspeed_multinode_launcher"] == "standard"
    assert SHIPPED["rdzv_backend"] == "static"


def test_two_machines_on_one_host_equal_one_process(tmp_path):
    base = save_base(tmp_path / "base")
    groups = write_groups(tmp_path / "groups.jsonl", n=2 * QUERIES * STEPS)
    config = zero_config(tmp_path, "multi_node.yaml")
    assert "deepspeed_multinode_launcher: standard" in config.read_text()
    out = tmp_path / "two-machines"
    args = train_args(base, groups, out, "--use_lora", "true", "--lora_r", "4")
    port = str(_free_port())
    machines = [
        subprocess.Popen(
            launcher(
                config, "train", *args, probes=("--sharding-report",),
                machines=("--num_machines", "2", "--machine_rank", str(rank),
                          "--main_process_ip", "127.0.0.1", "--main_process_port", port),
            ),
            env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in (0, 1)
    ]  # fmt: skip
    try:
        logs = [machine.communicate(timeout=900)[0] for machine in machines]
    finally:
        for machine in machines:
            machine.kill()
    for rank, (machine, log) in enumerate(zip(machines, logs, strict=True)):
        assert machine.returncode == 0, f"machine {rank}:\n{log[-5000:]}"
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2 and "DEEPSPEED" in info["distributed_type"]
    assert info["global_step"] == STEPS
    reports = sharding_reports(out)  # by global rank
    assert [(r["machine_rank"], r["local_rank"]) for r in reports] == [("0", "0"), ("1", "0")]
    for report in reports:
        assert report["world_size"] == 2, report
        assert report["sharded"] == report["parameters"] > 0, report
    got = weights(out)
    lora = ("--use_lora", "true", "--lora_r", "4")
    assert_same_weights(got, reference_train_step(base, groups, tmp_path / "reference", *lora))
    assert_moved(got, weights(base))
    with pytest.raises(AssertionError):  # the tolerance bites: half the learning rate fails
        half = reference_train_step(base, groups, tmp_path / "half", *lora, lr=LR / 2)
        assert_same_weights(got, half)
