"""``tiered config from-deepspeed``: a DeepSpeed ZeRO-Offload / ZeRO-Infinity config becomes
an offload TOML that ``tiered config check`` accepts, with every DeepSpeed key it cannot map
named (and why) in the file and on stderr; bad input is one ``error:`` line, exit 2."""

from __future__ import annotations

import json
import tomllib

import pytest

from tiered.config import load_config
from tiered.tools.cli import main

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("TIERED_HOME", str(tmp_path / "home"))


def write(tmp_path, obj, name="ds.json"):
    p = tmp_path / name
    p.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return p


def infinity(tmp_path, **over):
    cfg = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "zero_optimization": {
            "stage": 3,
            "offload_param": {"device": "nvme", "nvme_path": str(tmp_path / "nvme"), "pin_memory": True,
                              "buffer_count": 5, "buffer_size": 1e8},
            "offload_optimizer": {"device": "nvme", "nvme_path": str(tmp_path / "nvme"), "pin_memory": False,
                                  "fast_init": False},
            "stage3_prefetch_bucket_size": "auto",
        },
        "aio": {"block_size": 2097152, "queue_depth": 16, "thread_count": 2, "single_submit": False,
                "overlap_events": True},
    }
    cfg.update(over)
    return cfg


def test_zero_infinity_config_converts(tmp_path, capsys):
    out = tmp_path / "offload.toml"
    ds = write(tmp_path, infinity(tmp_path))
    assert main(["config", "from-deepspeed", str(ds), "-o", str(out), "--host-capacity", "64MiB",
                 "--storage-capacity", "256MiB"]) == 0
    err = capsys.readouterr().err
    data = tomllib.loads(out.read_text())
    assert data["tiers"]["nvme"] == {"path": str(tmp_path / "nvme"), "capacity": 256 * MiB}
    assert data["tiers"]["host"] == {"capacity": 64 * MiB}
    assert data["engine"] == {"backend": "aio", "chunk": 2 * MiB, "queue_depth": 16, "workers": 2}
    cfg = load_config(out)  # what tiered itself accepts
    assert cfg.engine.queue_depth == 16 and cfg.engine.chunk == 2 * MiB and cfg.engine.workers == 2
    for key in ("offload_param.buffer_count", "offload_param.buffer_size", "offload_optimizer.pin_memory",
                "offload_optimizer.fast_init", "zero_optimization.stage", "stage3_prefetch_bucket_size",
                "aio.single_submit", "aio.overlap_events", "gradient_clipping", "bf16",
                "train_micro_batch_size_per_gpu"):
        assert "not mapped: " in err and key in err, key
        assert key in out.read_text(), key  # and in the file's header
    assert "max_grad_norm" in err  # says where gradient_clipping goes instead
    assert "offload_param.pin_memory" not in err  # pinned, as tiered's host tier is: mapped


def test_cpu_offload_and_two_nvme_paths(tmp_path, capsys):
    ds = write(tmp_path, {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}})
    assert main(["config", "from-deepspeed", str(ds), "--storage-capacity", "64MiB"]) == 0
    got = capsys.readouterr()
    data = tomllib.loads(got.out)  # no -o: the TOML on stdout
    assert data["tiers"]["nvme"]["path"] == str(tmp_path / "home")  # tiered needs a storage tier
    assert "engine" not in data
    assert "offload_optimizer.device = 'cpu'" in got.err and "[owners.optim] host" in got.err

    two = infinity(tmp_path)
    two["zero_optimization"]["offload_optimizer"]["nvme_path"] = str(tmp_path / "nvme2")
    two["aio"] = {"block_size": 5000, "use_gds": True}
    assert main(["config", "from-deepspeed", str(write(tmp_path, two)), "--storage-capacity", "64MiB"]) == 0
    got = capsys.readouterr()
    data = tomllib.loads(got.out)
    assert data["tiers"]["nvme2"]["path"] == str(tmp_path / "nvme2")
    assert data["engine"] == {"backend": "kvikio", "chunk": 8192}
    assert "aio.block_size = 5000" in got.err and "cannot pin the optimizer state" in got.err


@pytest.mark.parametrize("content,message", [
    ('{"zero_optimization": ', "not valid JSON (line 1, column"),
    ("[1, 2]", "expected a JSON object"),
    ({"zero_optimization": {"offload_param": {"device": "disk"}}},
     "zero_optimization.offload_param.device = 'disk'"),
    ({"zero_optimization": {"offload_param": {"device": "nvme"}}},
     "zero_optimization.offload_param.nvme_path"),
    ({"zero_optimization": []}, "zero_optimization in"),
    ({"aio": {"queue_depth": 0}}, "aio.queue_depth = 0"),
    ({"aio": {"thread_count": "four"}}, "aio.thread_count = 'four'"),
    ({"aio": {"block_size": -1}}, "aio.block_size"),
])
def test_bad_input_is_one_error_line(tmp_path, capsys, content, message):
    ds = write(tmp_path, content)
    assert main(["config", "from-deepspeed", str(ds), "-o", str(tmp_path / "x.toml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.toml").exists()


def test_missing_file(tmp_path, capsys):
    assert main(["config", "from-deepspeed", str(tmp_path / "none.json")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'none.json'}: No such file or directory"


def test_deepspeed_aio_defaults_keep_tiered_defaults(tmp_path, capsys):
    ds = infinity(tmp_path, aio={"block_size": 1048576, "queue_depth": 8, "thread_count": 1})
    assert main(["config", "from-deepspeed", str(write(tmp_path, ds)), "--storage-capacity", "64MiB",
                 "--host-capacity", "64MiB"]) == 0
    got = capsys.readouterr()
    assert tomllib.loads(got.out)["engine"] == {"backend": "aio"}
    for key in ("aio.block_size = 1048576", "aio.queue_depth = 8", "aio.thread_count = 1"):
        assert f"{key}: DeepSpeed's default, so tiered's own default is kept" in got.err, key
    assert "aio values equal to DeepSpeed's defaults are not mapped" in got.out


def test_paths_beyond_the_basic_plane_and_control_characters(tmp_path, capsys):
    odd = str(tmp_path / 'nv\u00e9\U0001F600 "q" \\ x')
    ds = infinity(tmp_path)
    ds["zero_optimization"]["offload_param"]["nvme_path"] = odd
    ds["zero_optimization"]["offload_optimizer"]["nvme_path"] = odd
    src = write(tmp_path, ds, name="ds\U0001F600.json")
    out = tmp_path / "o.toml"
    assert main(["config", "from-deepspeed", str(src), "-o", str(out), "--storage-capacity", "64MiB",
                 "--host-capacity", "64MiB"]) == 0
    assert tomllib.loads(out.read_text(encoding="utf-8"))["tiers"]["nvme"]["path"] == odd


def test_output_in_a_missing_directory_names_the_output(tmp_path, capsys):
    ds = write(tmp_path, infinity(tmp_path))
    out = tmp_path / "missing" / "x.toml"
    assert main(["config", "from-deepspeed", str(ds), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out}: No such file or directory") and ".tmp-" not in err


def test_cpu_checkpointing_maps_to_activations_in_the_store(tmp_path, capsys):
    out = tmp_path / "offload.toml"
    ds = write(tmp_path, infinity(tmp_path, activation_checkpointing={
        "partition_activations": True, "cpu_checkpointing": True, "contiguous_memory_optimization": False,
        "number_checkpoints": 4, "synchronize_checkpoint_boundary": False, "profile": False}))
    assert main(["config", "from-deepspeed", str(ds), "-o", str(out), "--host-capacity", "64MiB",
                 "--storage-capacity", "256MiB"]) == 0
    err = capsys.readouterr().err
    assert tomllib.loads(out.read_text())["offload"] == {"activations": "host"}
    assert load_config(out).offload.activations == "host"
    for key in ("activation_checkpointing.partition_activations", "activation_checkpointing.number_checkpoints"):
        assert key in err, key
    assert "gradient_checkpointing_enable" in err  # says where checkpointing itself is switched on
    # mapped, with DeepSpeed's condition said in the note (and in the generated file's comment)
    assert "cpu_checkpointing only together with partition_activations" in err
    assert "cpu_checkpointing only together with partition_activations" in out.read_text()
    assert "partition_activations is off" not in err
    ds = write(tmp_path, infinity(tmp_path, activation_checkpointing={"cpu_checkpointing": True}), "alone.json")
    assert main(["config", "from-deepspeed", str(ds), "-o", str(tmp_path / "alone.toml"), "--host-capacity",
                 "64MiB", "--storage-capacity", "256MiB"]) == 0
    assert "partition_activations is off here: under DeepSpeed the activations stayed on the GPU" \
        in capsys.readouterr().err
    ds = write(tmp_path, infinity(tmp_path, activation_checkpointing={"cpu_checkpointing": False}), "off.json")
    assert main(["config", "from-deepspeed", str(ds), "-o", str(tmp_path / "off.toml"), "--host-capacity", "64MiB",
                 "--storage-capacity", "256MiB"]) == 0
    assert "offload" not in tomllib.loads((tmp_path / "off.toml").read_text())
