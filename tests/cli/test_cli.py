"""`mdl-serve` subcommands not covered elsewhere, run as a user runs them: `make-checkpoint`,
`generate` (files, and the demo clip on the demo checkpoint written on first use), the demo
checkpoint on the first `serve`, and `bench throughput`, `bench ttft`, `bench plot`.

`generate` and `bench` start real tiny engines in subprocesses (the fast in-process path
that tests/conftest.py puts in the environment, the flags of tests/fast_engine.py);
`make-checkpoint` and `bench plot`, which start neither engine nor server, run through the
same entry point (cli.main) in the test process.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from safetensors.numpy import load_file

from clips import make_clip
from fast_engine import FAST_CLI_FLAGS

TIMEOUT_S = 900


def mdl_serve(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "mdlserve.server.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def mdl_serve_in_process(capsys, *args: str) -> str:
    """`mdl-serve ARGS` through the console script's own entry point (cli.main), in this
    process: for subcommands that start no engine and no server (make-checkpoint, bench
    plot), where a fresh interpreter would only add its seconds of torch imports. Returns
    what the command printed."""
    from mdlserve.server import cli

    capsys.readouterr()
    assert cli.main(list(args)) in (None, 0)
    return capsys.readouterr().out


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


# ---------------------------------------------------------------- make-checkpoint


def test_make_checkpoint_tiny_is_seeded_and_complete(tmp_path, capsys):
    paths = {}
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        out = mdl_serve_in_process(capsys, "make-checkpoint", "--preset", "tiny", "--out", str(tmp_path / name),
                                   "--seed", seed)  # fmt: skip
        paths[name] = Path(out.strip())
        assert paths[name] == tmp_path / name
    files = {p.name for p in paths["a"].iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
            "processing_midashenglm.py", "model.safetensors", "chat_template.jinja"} <= files  # fmt: skip
    a, b, c = (load_file(str(paths[n] / "model.safetensors")) for n in "abc")
    assert a.keys() == b.keys() == c.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a), "same seed, same weights"
    assert any(not np.array_equal(a[k], c[k]) for k in a), "another seed, other weights"
    assert not any(k.startswith("audio_encoder.front_end") for k in a)


def test_make_checkpoint_frontend_buffers_and_7b_shapes_only(tmp_path, capsys):
    mdl_serve_in_process(capsys, "make-checkpoint", "--out", str(tmp_path / "fb"), "--frontend-buffers")
    weights = load_file(str(tmp_path / "fb" / "model.safetensors"))
    assert weights["audio_encoder.front_end.0.mel_scale.fb"].shape == (257, 64)
    assert weights["audio_encoder.front_end.0.spectrogram.window"].shape == (512,)

    mdl_serve_in_process(capsys, "make-checkpoint", "--preset", "7b", "--out", str(tmp_path / "7b"))
    config = json.loads((tmp_path / "7b" / "config.json").read_text())
    assert not (tmp_path / "7b" / "model.safetensors").exists(), "7b is shapes only (--load-format dummy)"
    assert config["text_config"]["hidden_size"] == 3584 and config["text_config"]["num_hidden_layers"] == 28
    assert config["audio_encoder_config"]["embed_dim"] == 1280 and config["audio_encoder_config"]["depth"] == 32


# ---------------------------------------------------------------- generate


@pytest.mark.slow
def test_generate_captions_audio_files(tiny_checkpoint, tmp_path):
    soundfile.write(tmp_path / "a.wav", make_clip(24000), 16000)
    soundfile.write(tmp_path / "b.flac", make_clip(24000, rate=48000, channels=2), 48000)  # 0.5 s stereo
    out = mdl_serve("generate", str(tmp_path / "a.wav"), str(tmp_path / "b.flac"), "--model", tiny_checkpoint,
                    "--max-tokens", "4", *FAST_CLI_FLAGS)
    rows = json_lines(out.stdout)
    assert [(r["audio"], r["seconds"]) for r in rows] == [(str(tmp_path / "a.wav"), 1.5),
                                                          (str(tmp_path / "b.flac"), 0.5)]  # fmt: skip
    assert all(isinstance(r["text"], str) and r["text"] for r in rows)


@pytest.mark.slow
def test_generate_without_arguments_writes_the_demo_checkpoint_and_captions_the_demo_clip(tmp_path):
    """`make generate` on a fresh machine: no checkpoint yet, no audio given."""
    out = mdl_serve("generate", "--max-tokens", "4", *FAST_CLI_FLAGS, cwd=tmp_path)
    assert (tmp_path / ".demo/tiny/config.json").exists() and (tmp_path / ".demo/tiny/model.safetensors").exists()
    (row,) = json_lines(out.stdout)
    assert row["audio"] == "<demo clip>" and row["seconds"] == 5.0 and row["text"]


# ---------------------------------------------------------------- serve


def test_first_serve_writes_the_demo_checkpoint(tmp_path, monkeypatch):
    """`make run` on a fresh machine: `serve` without --model writes .demo/tiny, then serves
    it. The engine and HTTP side of `serve` are tested in tests/gateway; here `serve` itself
    is replaced to see what it is handed."""
    from mdlserve.server import cli, serve

    handed = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(serve, "serve", lambda settings: handed.append(settings) or 0)
    assert not (tmp_path / ".demo").exists()
    assert cli.main(["serve", "--port", "1"]) == 0
    assert (tmp_path / ".demo/tiny/config.json").exists() and (tmp_path / ".demo/tiny/model.safetensors").exists()
    assert [s.model for s in handed] == [".demo/tiny"]
    stamp = (tmp_path / ".demo/tiny/model.safetensors").stat().st_mtime_ns
    cli.main(["serve", "--port", "1"])  # the second start reuses it
    assert (tmp_path / ".demo/tiny/model.safetensors").stat().st_mtime_ns == stamp


def test_serve_with_settings_out_of_range_exits_2_naming_them(capsys):
    from mdlserve.server import cli

    assert cli.main(["serve", "--max-num-seqs", "1", "--max-model-len", "1024", "--max-num-batched-tokens", "16384"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mdl-serve serve: 1 validation error for Settings")
    assert "max_num_batched_tokens (16384) is more than max_num_seqs x max_model_len (1 x 1024 = 1024)" in err
    assert "Traceback" not in err


def test_batch_takes_the_cuda_graph_flags_into_its_engine_settings():
    from mdlserve.server.batch.cli import SETTINGS_FIELDS
    from mdlserve.server.cli import build_parser
    from mdlserve.server.settings import Settings

    args = build_parser().parse_args(["batch", "clips/", "--output", "out.jsonl", "--cudagraph-mode", "PIECEWISE",
                                      "--cudagraph-capture-sizes", "16,1,8"])  # fmt: skip
    settings = Settings(**{k: v for k, v in vars(args).items() if k in SETTINGS_FIELDS})
    assert settings.cudagraph_mode == "PIECEWISE"
    assert settings.cudagraph_capture_sizes == [1, 8, 16]


# ---------------------------------------------------------------- bench


@pytest.fixture(scope="module")
def throughput_run(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "throughput"
    mdl_serve("bench", "throughput", "--smoke", "--model", tiny_checkpoint, "--out", str(out),
              "--ttft-clips", "2", "--ttft-repeats", "1")  # fmt: skip
    return out


@pytest.mark.slow
def test_bench_throughput(throughput_run):
    summary = json.loads((throughput_run / "summary.json").read_text())
    assert summary["errors"] == []
    assert [(r["clip_s"], r["n"]) for r in summary["ttft"]] == [(2.0, 1)]  # --ttft-clips in the same run
    (ttft,) = summary["ttft"]  # split by the engine's timestamps (one request: the parts add up)
    parts = [ttft[f"{k}_median_ms"] for k in ("queued", "engine_step", "frontend")]
    assert min(parts) >= 0 and ttft["engine_step_median_ms"] > 0 and sum(parts) == pytest.approx(ttft["median_ms"], abs=1e-3)  # summaries keep 4 decimals
    assert "plugin engine_step ms" in (throughput_run / "summary.md").read_text()
    rows = summary["throughput"]
    assert [(r["impl"], r["batch"]) for r in rows] == [("plugin", 1), ("plugin", 2)]
    for r in rows:
        assert r["wall_s"] > 0 and r["samples_per_s"] == pytest.approx(r["batch"] / r["wall_s"], rel=0.01)
    assert "### Throughput" in (throughput_run / "summary.md").read_text()


@pytest.mark.slow
def test_bench_ttft(tiny_checkpoint, tmp_path):
    mdl_serve("bench", "ttft", "--smoke", "--model", tiny_checkpoint, "--out", str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["errors"] == [] and summary["throughput"] == []
    rows = summary["ttft"]
    assert [(r["impl"], r["clip_s"]) for r in rows] == [("plugin", 2.0), ("plugin", 4.0)]
    assert all(r["n"] == 2 and r["median_ms"] > 0 for r in rows)  # 2 repeats after a warm-up
    # 2 s: 201 frames -> 50 patches -> 10 audio tokens; 4 s: 401 -> 100 -> 20.
    assert rows[1]["prompt_tokens"] - rows[0]["prompt_tokens"] == 10


@pytest.mark.slow
def test_bench_plot_redraws_a_results_directory(throughput_run, capsys):
    for name in ("summary.md", "throughput.png", "ttft.png"):
        (throughput_run / name).unlink()
    out = mdl_serve_in_process(capsys, "bench", "plot", str(throughput_run))
    assert {Path(p).name for p in out.split()} == {"summary.md", "throughput.png", "ttft.png"}
    for name in ("throughput.png", "ttft.png"):
        assert (throughput_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plugin samples/s" in (throughput_run / "summary.md").read_text()
