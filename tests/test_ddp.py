"""Two-process data-parallel training through torchrun (gloo on CPU)."""
import os
import subprocess
import sys
from dataclasses import replace

from diffgap import synth
from diffgap.checkpoint import load_checkpoint


def test_two_process_torchrun_training(tmp_path):
    synth.write(tmp_path / "data", replace(synth.SynthConfig(), n_train=600, n_val=10, n_test=10))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "diffgap.cli", "train", "--data", str(tmp_path / "data" / "train.npz"), "--out", str(tmp_path / "ck"),
           "--preset", "clap-tiny", "--steps", "8", "--no-progress", "--threads", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "x 2 process(es)" in proc.stdout  # printed once, by rank 0
    model, meta = load_checkpoint(tmp_path / "ck")
    assert meta["step"] == 8 and meta["world_size"] == 2
    assert meta["ranks_in_sync"] is True, "gradient averaging must keep both ranks' weights identical"
