"""benchmarks/e2e/ttft_sweep.py end to end with tests/_fake_openai_server.py as the "vllm serve"
command: server lifecycle, incremental JSON, time budget, failures, density statistics."""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("yaml")

from benchmarks.e2e import ttft_sweep  # noqa: E402

FAKE_SERVER = os.path.join(os.path.dirname(__file__), "_fake_openai_server.py")


def write_configs(tmp_path, max_model_len=4096) -> str:
    for backend, suffix in (("proxyattn", "proxyattn"), ("FLASH_ATTN", "dense")):
        (tmp_path / f"fake-{suffix}.yaml").write_text(
            f"model: /not/used\nmax-model-len: {max_model_len}\nmax-num-batched-tokens: 100\n"
            f"attention-backend: {backend}\n")
    return str(tmp_path / "fake-proxyattn.yaml")


def sweep_args(tmp_path, *extra, fake_args="--ttft-per-token-s 0.0002 --itl-s 0.002"):
    return ["--model", "fake-model", "--config", write_configs(tmp_path),
            "--serve-cmd", f"{shlex.quote(sys.executable)} {FAKE_SERVER} {fake_args}",
            "--lengths", "100,300", "--repeats", "2", "--warmups", "1", "--warmup-len", "50",
            "--output-len", "4", "--mix-long", "0", "--decode-requests", "0",
            "--out", str(tmp_path / "out.json"), *extra]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_full_sweep_writes_json_and_prints_the_table_last(tmp_path, capsys):
    code = ttft_sweep.main(sweep_args(
        tmp_path, "--density-pass", "--mix-long", "2", "--mix-long-range", "100:200",
        "--mix-rate", "50", "--mix-short", "3", "--mix-short-rate", "50", "--mix-short-len", "20",
        "--mix-short-output", "5"))
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads((tmp_path / "out.json").read_text())
    assert data["gpu"] == "unknown" or data["gpu"]
    assert set(data["versions"]) == {"vllm", "torch", "triton", "proxyattn-vllm"}
    assert data["model"] == "fake-model" and "--density-pass" in data["command"]
    runs = {(r["backend"], r["prompt_len"]): r for r in data["runs"]}
    assert set(runs) == {(b, n) for b in ("FLASH_ATTN", "proxyattn") for n in (100, 300)}
    for (backend, n), r in runs.items():
        assert r["status"] == "ok" and r["n"] == 2 and r["failed"] == 0
        # The fake server's TTFT: 20 ms + 0.2 ms per prompt token (plus load on a busy machine).
        assert 20 + 0.2 * n - 1 <= r["mean_ttft_ms"] <= 20 + 0.2 * n + 150
        assert r["p50_ttft_ms"] <= r["p99_ttft_ms"] and r["mean_tpot_ms"] is not None
    # Density: the fake writes 1.0 for the first 100-token chunk and 0.25 for later ones.
    assert runs[("proxyattn", 100)]["density"] == pytest.approx(1.0)
    assert runs[("proxyattn", 300)]["density"] == pytest.approx(0.5)
    assert runs[("FLASH_ATTN", 300)]["density"] is None
    assert data["density_pass"]["status"] == "ok"
    for backend in ("FLASH_ATTN", "proxyattn"):
        mix = data["poisson_mix"][backend]
        assert mix["status"] == "ok" and mix["long"]["completed"] == 2 and mix["short"]["completed"] == 3
    phases = {(r["backend"], r["phase"]) for r in data["requests"]}
    assert {("FLASH_ATTN", "sweep"), ("proxyattn", "mix-short"), ("proxyattn", "density")} <= phases
    assert len([r for r in data["requests"] if r["phase"] == "sweep"]) == 2 * 2 * 2
    # Three starts (two timed, one with statistics), each logged, each stopped.
    assert [s["name"] for s in data["servers"]] == ["FLASH_ATTN", "proxyattn", "proxyattn-density"]
    for server in data["servers"]:
        assert os.path.exists(server["log"]) and server["startup_s"] >= 0
        assert not port_open(int(server["cmd"].split("--port ")[1].split()[0]))  # stopped
    assert "--enforce-eager" in data["servers"][2]["cmd"] and "--enforce-eager" not in data["servers"][1]["cmd"]
    # The table comes last: one row per length with the speedup, then the mixes and the legend.
    lines = out.rstrip().splitlines()
    assert lines[-1].startswith("speedup = FLASH_ATTN mean TTFT / proxyattn mean TTFT")
    rows = [line for line in lines if line.split("|")[0].strip() in ("100", "300")]
    assert len(rows) == 2 and rows[1].split("|")[-1].strip().endswith("x")
    assert rows[1].split("|")[-2].strip() == "0.500"


def test_time_budget_skips_lengths_that_cannot_fit(tmp_path):
    # 1M tokens at FA3 speed is predicted to take minutes: skipped without being sent.
    args = sweep_args(tmp_path, "--backends", "proxyattn", "--time-budget-s", "60")
    args[args.index("--lengths") + 1] = "100,1M"
    args[args.index("--config") + 1] = write_configs(tmp_path, max_model_len=1 << 21)
    assert ttft_sweep.main(args) == 0
    data = json.loads((tmp_path / "out.json").read_text())
    status = {r["prompt_len"]: r for r in data["runs"]}
    assert status[100]["status"] == "ok"
    assert status[1 << 20]["status"] == "skipped" and "time budget" in status[1 << 20]["reason"]
    assert all(r["prompt_len"] == 100 for r in data["requests"])


def test_time_budget_cuts_repeats_before_skipping(tmp_path, monkeypatch):
    # Every request predicted at 10 s and a 15 s budget: one repeat of each length fits.
    monkeypatch.setattr(ttft_sweep.TimePredictor, "e2e", lambda self, n: 10.0)
    args = sweep_args(tmp_path, "--backends", "FLASH_ATTN", "--time-budget-s", "15", "--warmups", "0")
    assert ttft_sweep.main(args) == 0
    runs = json.loads((tmp_path / "out.json").read_text())["runs"]
    assert [(r["prompt_len"], r["status"], r["n"]) for r in runs] == [(100, "ok", 1), (300, "ok", 1)]
    assert all(r["reason"] == "time budget: 1 of 2 repeats" for r in runs)


def test_lengths_are_clamped_to_leave_room_for_decoding(tmp_path):
    args = sweep_args(tmp_path, "--backends", "FLASH_ATTN", fake_args="--itl-s 0")
    args[args.index("--lengths") + 1] = "4K"  # the configs' max-model-len is 4096
    assert ttft_sweep.main(args) == 0
    runs = json.loads((tmp_path / "out.json").read_text())["runs"]
    assert [(r["prompt_len"], r["status"]) for r in runs] == [(4096 - 4, "ok")]


def test_a_server_that_dies_at_startup_is_reported_with_its_log(tmp_path, capsys):
    code = ttft_sweep.main(sweep_args(tmp_path, "--backends", "FLASH_ATTN",
                                      fake_args="--exit-at-start 3"))
    out = capsys.readouterr().out
    assert code == 1
    data = json.loads((tmp_path / "out.json").read_text())
    error = data["servers"][0]["error"]
    assert "exited with code 3 during startup" in error
    assert "RuntimeError: fake engine failed to start" in error  # the log's tail
    assert [r["status"] for r in data["runs"]] == ["failed", "failed"]
    assert "server FLASH_ATTN failed: server exited with code 3" in out


def test_rejected_requests_are_failed_runs_not_crashes(tmp_path):
    code = ttft_sweep.main(sweep_args(tmp_path, "--backends", "FLASH_ATTN",
                                      fake_args="--max-model-len 200"))
    assert code == 0
    runs = {r["prompt_len"]: r for r in json.loads((tmp_path / "out.json").read_text())["runs"]}
    assert runs[100]["status"] == "ok"
    assert runs[300]["status"] == "failed" and runs[300]["failed"] == 2
    assert "maximum context length is 200" in runs[300]["reason"]


def test_append_merges_backends_run_separately(tmp_path, capsys):
    assert ttft_sweep.main(sweep_args(tmp_path, "--backends", "FLASH_ATTN")) == 0
    assert ttft_sweep.main(sweep_args(tmp_path, "--backends", "proxyattn", "--append")) == 0
    data = json.loads((tmp_path / "out.json").read_text())
    assert sorted({r["backend"] for r in data["runs"]}) == ["FLASH_ATTN", "proxyattn"]
    assert len(data["runs"]) == 4
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("speedup =")


def test_density_only_pass_then_timed_runs_appended_get_its_densities(tmp_path):
    # GPU plan: the density pass runs while the GPU is busy with untimed work, the timed
    # sweep later on a quiet GPU, appended to the same file.
    assert ttft_sweep.main(sweep_args(tmp_path, "--backends", "proxyattn", "--density-only")) == 0
    data = json.loads((tmp_path / "out.json").read_text())
    assert [s["name"] for s in data["servers"]] == ["proxyattn-density"] and data["runs"] == []
    assert data["density_pass"]["lengths"]["300"]["density"] == pytest.approx(0.5)
    assert ttft_sweep.main(sweep_args(tmp_path, "--backends", "FLASH_ATTN,proxyattn", "--append")) == 0
    data = json.loads((tmp_path / "out.json").read_text())
    density = {(r["backend"], r["prompt_len"]): r["density"] for r in data["runs"]}
    assert density == {("FLASH_ATTN", 100): None, ("FLASH_ATTN", 300): None,
                       ("proxyattn", 100): pytest.approx(1.0), ("proxyattn", 300): pytest.approx(0.5)}
    assert data["density_pass"]["status"] == "ok" and "--density-only" in data["earlier_commands"][0]
    # and the other order: a density-only pass appended to timed runs keeps them
    assert ttft_sweep.main(sweep_args(tmp_path, "--backends", "proxyattn", "--density-only", "--append")) == 0
    assert len(json.loads((tmp_path / "out.json").read_text())["runs"]) == 4


def test_sigterm_stops_the_server_and_keeps_the_results(tmp_path):
    # A first token that takes 30 s keeps the sweep busy until it is terminated.
    args = sweep_args(tmp_path, "--backends", "FLASH_ATTN", "--warmups", "0",
                      fake_args="--ttft-s 30")
    proc = subprocess.Popen([sys.executable, os.path.join(ttft_sweep.REPO, "benchmarks", "e2e", "ttft_sweep.py"),
                             *args], stdout=subprocess.PIPE, text=True)
    port = None
    for line in proc.stdout:
        if "starting:" in line:
            port = int(line.split("--port ")[1].split()[0])
        if "healthy after" in line:
            break
    time.sleep(0.3)  # the first request is in flight
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 130
    assert "interrupted" in rest and not port_open(port)
    assert json.loads((tmp_path / "out.json").read_text())["servers"][0]["startup_s"] >= 0


def test_missing_dense_twin_is_an_argument_error(tmp_path):
    config = write_configs(tmp_path)
    os.remove(tmp_path / "fake-dense.yaml")
    with pytest.raises(SystemExit) as exc:
        ttft_sweep.main(["--config", config, "--out", str(tmp_path / "o.json")])
    assert exc.value.code == 2


def stats_line(ctx, q_len, density, layer, pid=1, **extra):
    return json.dumps({"layer": layer, "ctx": ctx, "q_len": q_len, "density": density,
                       "pid": pid, **extra})


def test_density_reader_is_tolerant_and_attributes_requests(tmp_path):
    path = tmp_path / "stats.jsonl"
    lines = []
    # Request 1: 200 tokens in chunks of 100 (ctx 0, 100), two layers.
    for ctx, density in ((0, 1.0), (100, 0.5)):
        for layer in (0, 1):
            lines.append(stats_line(ctx, 100, density, layer, kept_mass=0.9))
    lines += ["", "not json", json.dumps({"layer": 0, "ctx": 0})]  # foreign lines are skipped
    # Request 2: 150 tokens, one chunk of 100 then 50; a single chunk at ctx 0 for layer 0 first.
    for ctx, q_len, density in ((0, 100, 1.0), (100, 50, 0.2)):
        for layer in (0, 1):
            lines.append(stats_line(ctx, q_len, density, layer))
    path.write_text("\n".join(lines) + "\n" + '{"layer": 1, "ctx": 0, "q_l')  # half-written tail
    items = ttft_sweep.read_stats(str(path))
    assert len(items) == 8
    by_len = ttft_sweep.lines_by_prompt_len(items)
    assert set(by_len) == {200, 150}
    assert ttft_sweep.weighted_density(by_len[200]) == pytest.approx(0.75)
    assert ttft_sweep.weighted_density(by_len[150]) == pytest.approx((100 * 1.0 + 50 * 0.2) / 150)
    assert ttft_sweep.weighted_density([]) is None
    assert ttft_sweep.read_stats(str(tmp_path / "absent.jsonl")) == []


def test_prompt_density_weights_chunks_by_their_causal_blocks():
    # A 200-token prompt in two chunks of 100 with blocks of 10: the first chunk has
    # 1 + ... + 10 = 55 causal blocks per head, the second 11 + ... + 20 = 155. The prompt's
    # density is selected / causal blocks, not the q_len-weighted mean of 1.0 and 0.5 (0.75).
    items = [json.loads(stats_line(0, 100, 1.0, 0, causal_blocks=55)),
             json.loads(stats_line(100, 100, 0.5, 0, causal_blocks=155))]
    expected = (55 * 1.0 + 155 * 0.5) / (55 + 155)
    assert ttft_sweep.weighted_density(items) == pytest.approx(expected)
    assert expected < 0.7


def test_density_reader_splits_consecutive_single_chunk_requests_and_ranks():
    # Two one-chunk requests in a row (ctx 0 both times), written by two tensor-parallel ranks
    # whose buffered lines reach the file one rank after the other.
    items = []
    for pid in (7, 8):
        for n, density in ((100, 0.4), (80, 0.6)):
            for layer in (0, 1):
                items.append({"layer": layer, "ctx": 0, "q_len": n, "density": density, "pid": pid})
    requests = ttft_sweep.split_requests(items)
    assert [len(r) for r in requests] == [4, 4]
    by_len = ttft_sweep.lines_by_prompt_len(items)
    assert ttft_sweep.weighted_density(by_len[100]) == pytest.approx(0.4)
    assert ttft_sweep.weighted_density(by_len[80]) == pytest.approx(0.6)


def test_time_predictor_calibrates_on_measurements():
    predictor = ttft_sweep.TimePredictor(output_len=16)
    at_128k = predictor.e2e(131072)
    assert 10 < at_128k < 15  # the FA3 anchor: 10.2 s TTFT at 128K, plus margin and decode
    predictor.observe(131072, predictor.model(131072) / 2)  # measured twice as fast
    assert predictor.e2e(262144) == pytest.approx(predictor.model(262144) / 2 * ttft_sweep.PREDICTION_MARGIN)


def _process_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (exited, or a zombie nobody has reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(sys.platform != "linux", reason="the server's parent-death signal is Linux-only")
def test_server_dies_with_a_sweep_killed_by_sigkill(tmp_path):
    # A sweep SIGKILLed by a wall-clock limit cannot run its cleanup; its server (in its own
    # session, out of reach of the group kill) must still go, or it keeps holding the GPU.
    parent_code = (
        "import os, sys, time\n"
        f"sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})\n"
        "from benchmarks.e2e.ttft_sweep import ServerProcess\n"
        "server = ServerProcess([sys.executable, '-c', 'import time; time.sleep(120)'],\n"
        f"                       {str(tmp_path / 'server.log')!r}, dict(os.environ), 0)\n"
        "server.start()\n"
        "print(server.proc.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    server_pid = int(parent.stdout.readline())
    assert not _process_gone(server_pid)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 15
    while not _process_gone(server_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    gone = _process_gone(server_pid)
    if not gone:
        os.kill(server_pid, signal.SIGKILL)
    assert gone, "the server outlived its killed sweep"


def test_sparse_kernel_variants_share_the_proxyattn_config():
    yaml_config = {"attention-backend": "proxyattn",
                   "additional-config": {"proxyattn": {"max_density": 0.1}, "other_plugin": {"x": 1}}}
    assert ttft_sweep.backend_kind("proxyattn:fa3") == "proxyattn"
    assert ttft_sweep.is_sparse("proxyattn:fa3") and not ttft_sweep.is_sparse("FLASH_ATTN")
    assert ttft_sweep.proxyattn_override("proxyattn", yaml_config) == []
    flag, value = ttft_sweep.proxyattn_override("proxyattn:fa3", yaml_config)
    assert flag == "--additional-config"
    assert json.loads(value) == {"proxyattn": {"max_density": 0.1, "sparse_kernel": "fa3"},
                                 "other_plugin": {"x": 1}}
    # The YAML may hold additional-config as a JSON string too (serve_configs/ do).
    _, value = ttft_sweep.proxyattn_override(
        "proxyattn:triton", {"additional-config": '{"proxyattn": {"gamma": 0.9}}'})
    assert json.loads(value) == {"proxyattn": {"gamma": 0.9, "sparse_kernel": "triton"}}
    assert ttft_sweep.config_for("x-proxyattn.yaml", "proxyattn:fa3") == "x-proxyattn.yaml"


def test_density_variants_serve_a_cap_or_a_profile():
    yaml_config = {"additional-config": {"proxyattn": {"max_density": 0.1, "gamma": 0.9}}}
    assert ttft_sweep.parse_backend("proxyattn:fa3@density0.2") == ("proxyattn", "fa3", "density0.2")
    assert ttft_sweep.parse_backend("FLASH_ATTN") == ("FLASH_ATTN", None, None)
    assert ttft_sweep.is_sparse("proxyattn@density0.3") and ttft_sweep.backend_kind("proxyattn@x") == "proxyattn"
    _, value = ttft_sweep.proxyattn_override("proxyattn@density0.3", yaml_config)
    assert json.loads(value) == {"proxyattn": {"max_density": 0.3, "gamma": 0.9}}
    _, value = ttft_sweep.proxyattn_override("proxyattn:fa3@paper-llama8b-gamma0.95", yaml_config)
    assert json.loads(value) == {"proxyattn": {
        "gamma": 0.9, "sparse_kernel": "fa3", "max_density": None, "budget_profile": "paper-llama8b-gamma0.95",
        "budget_profile_file": ttft_sweep.PROFILES_JSON}}
    # What the server is given is a valid config: it loads the profile.
    from proxyattn_vllm import ProxyAttnConfig

    assert ProxyAttnConfig.from_dict(json.loads(value)["proxyattn"]).load_budget_profile().num_layers == 32
    for bad, message in (("density0", "densityX with X in"), ("density1.5", "densityX with X in"),
                         ("no-such-profile", "neither densityX nor a profile")):
        with pytest.raises(SystemExit, match=message):
            ttft_sweep.proxyattn_override(f"proxyattn@{bad}", yaml_config)
    # A profile's density is prescribed: computed for the run; a cap is labelled as a cap.
    density = ttft_sweep.prescribed_density("proxyattn@paper-llama8b-gamma0.95", 65536, 8192)
    assert 0.1 < density < 0.5
    assert ttft_sweep.prescribed_density("proxyattn@density0.1", 65536, 8192) is None
    assert ttft_sweep.density_label("proxyattn@density0.1", None) == "<= 0.1"


def test_table_has_a_speedup_column_per_sparse_kernel():
    def run(backend, n, ttft):
        return {"backend": backend, "prompt_len": n, "status": "ok", "mean_ttft_ms": ttft,
                "p99_ttft_ms": ttft, "mean_tpot_ms": 5.0, "density": 0.1 if backend == "proxyattn" else None}

    results = {"gpu": "g", "model": "m", "poisson_mix": {}, "runs": [
        run("FLASH_ATTN", 1000, 400.0), run("proxyattn", 1000, 200.0), run("proxyattn:fa3", 1000, 100.0)]}
    lines = ttft_sweep.format_table(results).splitlines()
    row = next(line for line in lines if line.lstrip().startswith("1000"))
    cells = [c.strip() for c in row.split("|")]
    assert cells[-4:] == ["0.100", "2.00x", "-", "4.00x"]
    assert lines[-1].startswith("speedup = FLASH_ATTN mean TTFT / proxyattn or proxyattn:fa3 mean TTFT")


def test_decode_phase_measures_tpot_against_the_dense_backend(tmp_path, capsys):
    args = sweep_args(tmp_path, fake_args="--ttft-per-token-s 0.0001 --itl-s 0.004")
    args[args.index("--lengths") + 1] = "100"
    args[args.index("--decode-requests") + 1] = "2"
    args += ["--decode-prompt-len", "200", "--decode-len", "12"]
    assert ttft_sweep.main(args) == 0
    data = json.loads((tmp_path / "out.json").read_text())
    decode = data["decode"]
    for backend in ("FLASH_ATTN", "proxyattn"):
        # Decode runs right after the warm-ups, so a budget cut hits the longest prompt instead.
        phases = [r["phase"] for r in data["requests"] if r["backend"] == backend]
        assert phases == ["decode", "decode", "sweep", "sweep"], phases
        d = decode[backend]
        assert (d["status"], d["n"], d["prompt_len"], d["output_len"]) == ("ok", 2, 200, 12)
        assert 3.0 <= d["mean_tpot_ms"] <= 4.0 + 40, d  # the fake server sleeps 4 ms between tokens
        # Engine-side: the fake's /metrics reports its scheduled 4 ms per token, load or not.
        assert d["server_mean_tpot_ms"] == pytest.approx(4.0) and d["server_mean_itl_ms"] == pytest.approx(4.0)
    out = capsys.readouterr().out
    assert "decode proxyattn: mean TPOT" in out and "x FLASH_ATTN); engine-side 4.0 ms (1.000x)" in out


def test_density_flush_request_fits_max_model_len_and_is_not_a_measured_length(tmp_path):
    # Seen on the H200: with max-model-len 32768 a flush of 4 chunks + 1 = 32769 tokens was
    # rejected, so the 32K request's statistics were never written.
    args = sweep_args(tmp_path, "--backends", "proxyattn", "--density-only")
    args[args.index("--lengths") + 1] = "100,400"
    for name in ("fake-proxyattn.yaml", "fake-dense.yaml"):
        path = tmp_path / name
        path.write_text(path.read_text().replace("max-model-len: 4096", "max-model-len: 404"))
    assert ttft_sweep.main(args) == 0
    summary = json.loads((tmp_path / "out.json").read_text())["density_pass"]
    # 4 * 100 + 1 = 401 would fit, 404 - 4 output tokens = 400 is the measured length: 399.
    assert summary["flush_request_len"] == 399 and "flush_failed" not in summary
    assert summary["lengths"]["400"]["status"] == "ok"
