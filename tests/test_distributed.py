"""torchrun with 2 CPU processes (gloo) against 1 process with the doubled batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import QUICK, ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFTUNE_DIST_TIMEOUT": "120"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "preftune", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def sft_args(model, out, batch, *flags: str, **extra) -> list[str]:
    args = ["sft", "--model", str(model), "--data", str(QUICK / "demos.jsonl"), "--out", str(out),
            "--batch-size", str(batch), "--lr", "3e-3", "--eval-split", "0.1", "--seed", "5", "--threads", "1"]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args + list(flags)


def assert_weights_close(a, b, atol):
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=1e-4)


def test_sft_two_ranks_match_one_rank_with_double_batch(tmp_path, tiny_model_dir):
    launch(2, sft_args(tiny_model_dir, tmp_path / "two", 4, max_steps=6, save_every=3))
    launch(1, sft_args(tiny_model_dir, tmp_path / "one", 8, max_steps=6))
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert two["world_size"] == 2 and len(set(two["rank_param_checksums"])) == 1
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-4)
    la = [json.loads(l)["loss"] for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l)["loss"] for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-4)
    assert_weights_close(tmp_path / "two", tmp_path / "one", atol=1e-5)

    # The checkpoint the 2-rank run wrote at step 3 resumes in a single process (batch 8 = 2 x 4).
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    os.rename(tmp_path / "two" / "checkpoints" / "step-000003", resumed / "checkpoints" / "step-000003")
    launch(1, sft_args(tiny_model_dir, resumed, 8, "--resume", max_steps=6))
    assert_weights_close(resumed, tmp_path / "one", atol=1e-5)


def test_sft_fsdp_with_lora_matches_one_rank(tmp_path, tiny_model_dir):
    common = dict(max_steps=4, lora_r=4, lr="1e-2")
    launch(2, sft_args(tiny_model_dir, tmp_path / "fsdp", 4, "--fsdp", "--lora", save_every=2, **common))
    launch(1, sft_args(tiny_model_dir, tmp_path / "one", 8, "--lora", **common))
    assert_weights_close(tmp_path / "fsdp", tmp_path / "one", atol=1e-5)
    assert (tmp_path / "fsdp" / "checkpoints" / "step-000002" / "model.safetensors").exists()


def test_stages_without_data_parallelism_refuse_torchrun(monkeypatch):
    from preftune.distributed import require_single_process
    from preftune.errors import PreftuneError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PreftuneError, match="preftune ppo runs in one process; it was started by torchrun with 2"):
        require_single_process("ppo")
    monkeypatch.setenv("WORLD_SIZE", "1")
    require_single_process("ppo")
