"""benchmarks/e2e/loadtest.py against a fake OpenAI-compatible streaming server with known timings
(tests/_fake_openai_server.py): metric math, failure accounting, prompt construction, CLI."""
from __future__ import annotations

import datetime
import json
import math
import os
import random
import socket
import sys

import pytest

pytest.importorskip("aiohttp")

from benchmarks.e2e import loadtest  # noqa: E402
from tests._fake_openai_server import FakeOptions, FakeServer  # noqa: E402

# Field names of `vllm bench serve` JSON that the result must carry.
VLLM_BENCH_NAMES = {"completed", "failed", "total_input_tokens", "total_output_tokens",
                    "request_throughput", "output_throughput", "duration"} | {
    f"{stat}_{metric}_ms" for stat in ("mean", "median", "std", "p90", "p99")
    for metric in ("ttft", "tpot", "itl", "e2el")}
# Timer and event-loop overhead on a loaded 2-core CI machine: measured times may exceed the
# server's delays by this much, never undercut them. Delays between the events a test tells
# apart are larger than this.
SLACK_MS = 60.0


@pytest.fixture
def serve():
    servers = []

    def start(**options) -> FakeServer:
        server = FakeServer(FakeOptions(**options)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def config(server, **kw) -> loadtest.LoadTestConfig:
    kw.setdefault("progress", False)
    kw.setdefault("warmup_requests", 0)
    return loadtest.LoadTestConfig(base_url=server.base_url, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_match_the_servers_delays(serve):
    np = pytest.importorskip("numpy")
    # TTFT = 20 ms + 0.2 ms per prompt token: 40/60/80/100 ms for 100..400 tokens; then one
    # token every 25 ms, so the last token comes 100 ms after the first.
    server = serve(ttft_s=0.02, ttft_per_token_s=0.0002, itl_s=0.025)
    result = loadtest.run(config(server, prompt_lens=[100, 200, 300, 400], num_prompts=8,
                                 output_len=5, warmup_requests=1))
    assert result["completed"] == 8 and result["failed"] == 0
    assert result["total_input_tokens"] == 2 * (100 + 200 + 300 + 400)
    assert result["total_output_tokens"] == 8 * 5
    # Hard bounds: nothing arrives before the server sends it.
    for r in result["requests"]:
        expected_ttft = 20 + 0.2 * r["prompt_len"]
        assert r["ttft_ms"] >= expected_ttft - 1, r
        assert r["e2el_ms"] >= expected_ttft + 4 * 25 - 1, r
        assert len(r["itl_ms"]) == 4
        # TPOT is defined from e2e and TTFT, not from the ITLs.
        assert r["tpot_ms"] == pytest.approx((r["e2el_ms"] - r["ttft_ms"]) / 4)
        assert r["usage_from_server"] and r["output_tokens"] == 5 and r["prompt_tokens"] == r["prompt_len"]
    # Upper bounds on the least disturbed request of each length (a busy machine delays some).
    for length in (100, 200, 300, 400):
        group = [r for r in result["requests"] if r["prompt_len"] == length]
        assert min(r["ttft_ms"] for r in group) <= 20 + 0.2 * length + SLACK_MS, group
    # A late first token shortens the span after it, so TPOT is bounded on the best request.
    assert 25 - 1 <= max(r["tpot_ms"] for r in result["requests"]) <= 25 + SLACK_MS / 2
    ttfts = [r["ttft_ms"] for r in result["requests"]]
    assert result["mean_ttft_ms"] == pytest.approx(np.mean(ttfts))
    assert result["median_ttft_ms"] == pytest.approx(np.median(ttfts))
    assert result["std_ttft_ms"] == pytest.approx(np.std(ttfts))
    assert result["p90_ttft_ms"] == pytest.approx(np.percentile(ttfts, 90))
    assert result["p99_ttft_ms"] == pytest.approx(np.percentile(ttfts, 99))
    itls = [gap for r in result["requests"] for gap in r["itl_ms"]]
    assert result["p99_itl_ms"] == pytest.approx(np.percentile(itls, 99))
    assert result["mean_ttft_ms"] >= 70 - 1
    by_len = result["by_prompt_len"]
    assert list(by_len) == ["100", "200", "300", "400"]
    assert all(by_len[k]["completed"] == 2 for k in by_len)
    assert by_len["100"]["mean_ttft_ms"] < by_len["400"]["mean_ttft_ms"] - 20
    # Sequential: the next request starts after the previous one ended.
    reqs = sorted(result["requests"], key=lambda r: r["start_s"])
    for a, b in zip(reqs, reqs[1:]):
        assert b["start_s"] >= a["start_s"] + a["e2el_ms"] / 1e3


def test_percentiles_and_std_by_hand():
    stats = loadtest.describe([4.0, 1.0, 3.0, 2.0])
    assert stats["mean"] == 2.5 and stats["median"] == 2.5
    assert stats["p90"] == pytest.approx(3.7) and stats["p99"] == pytest.approx(3.97)
    assert stats["std"] == pytest.approx(math.sqrt(1.25))
    assert loadtest.describe([])["p99"] is None
    assert loadtest.percentile([5.0], 99) == 5.0


def test_rejected_requests_are_counted_with_the_servers_message(serve, capsys):
    server = serve(max_model_len=250)
    code = loadtest.main(["--base-url", server.base_url, "--random-input-len", "100,300",
                          "--num-prompts", "4", "--random-output-len", "3", "--disable-tqdm"])
    out = capsys.readouterr().out
    assert code == 0  # some requests completed: failures are reported, not fatal
    assert "completed 2  failed 2" in out
    assert "failed x2: HTTP 400: This model's maximum context length is 250 tokens" in out
    # The summary table is the last thing printed.
    assert out.rstrip().splitlines()[-1].startswith("failed x2")

    result = loadtest.run(config(server, prompt_lens=[300], num_prompts=2, output_len=3))
    assert result["completed"] == 0 and result["failed"] == 2
    assert all(r["error"].startswith("HTTP 400: This model's maximum") for r in result["requests"])
    assert result["mean_ttft_ms"] is None and result["errors"][0]["count"] == 2


def test_failed_warm_ups_are_counted_with_their_reasons(serve):
    server = serve(max_model_len=250)
    result = loadtest.run(config(server, prompt_lens=[300], num_prompts=0, warmup_requests=2, output_len=2))
    assert result["warmup_failed"] == 2
    (reason,) = result["warmup_errors"]
    assert reason.startswith("HTTP 400: This model's maximum context length is 250 tokens")
    ok = loadtest.run(config(server, prompt_lens=[100], num_prompts=0, warmup_requests=1, output_len=2))
    assert ok["warmup_failed"] == 0 and ok["warmup_errors"] == []


def test_an_error_event_in_the_stream_fails_the_request(serve):
    server = serve(stream_error_after=2, itl_s=0.0)
    result = loadtest.run(config(server, prompt_lens=[20], output_len=5))
    assert result["failed"] == 1 and result["completed"] == 0
    assert result["requests"][0]["error"] == "error in stream: engine core died"


def test_all_requests_failing_exits_1(serve):
    server = serve(max_model_len=50)
    assert loadtest.main(["--base-url", server.base_url, "--random-input-len", "100",
                          "--random-output-len", "2", "--disable-tqdm", "--num-warmups", "0"]) == 1


def test_unreachable_server_is_one_line_and_exit_2(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert loadtest.main(["--base-url", url, "--disable-tqdm"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error: cannot reach a server at " + url)
    assert "vllm serve" in err
    with pytest.raises(loadtest.ServerUnreachable):
        loadtest.run(loadtest.LoadTestConfig(base_url=url, progress=False))


def test_token_id_prompts_are_exact_unique_and_safe(serve):
    server = serve(itl_s=0.0)
    cfg = config(server, prompt_lens=[64, 200], num_prompts=6, output_len=2, warmup_requests=2, seed=7)
    first = loadtest.run(cfg)
    second = loadtest.run(cfg)  # same seed, same server: still no shared prefix
    prompts = server.options.prompts
    assert len(prompts) == 2 * (6 + 2)
    assert sorted(len(p) for p in prompts[2:8]) == [64, 64, 64, 200, 200, 200]
    assert [r["prompt_tokens"] for r in first["requests"]] == [r["prompt_len"] for r in first["requests"]]
    # Unique within the first 8 tokens (one token block), so no cache block is ever shared.
    assert len({tuple(p[:8]) for p in prompts}) == len(prompts)
    assert all(3 <= t <= 250 for p in prompts for t in p)
    assert first["prefix_nonce"] != second["prefix_nonce"]
    # The seed fixes the prompt bodies.
    assert prompts[2][8:] == prompts[10][8:]


def write_byte_level_tokenizer(path) -> str:
    """The dummy benchmark model's byte-level tokenizer (3 specials + 256 bytes)."""
    from benchmarks.common.dummy_llama import write_dummy_llama

    write_dummy_llama(str(path), num_layers=1)
    return str(path)


def write_merging_tokenizer(path, corpus: str) -> str:
    """A small trained BPE that merges across the bytes of words and prepends BOS, so that
    decode/encode round trips shift counts and special tokens count."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([corpus], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                   "eos_token": "</s>", "unk_token": "<unk>"}, f)
    return str(path)


def test_text_prompts_have_exact_token_counts(serve, tmp_path):
    transformers = pytest.importorskip("transformers")
    essays = tmp_path / "essays"
    essays.mkdir()
    rng = random.Random(0)
    words = "the cat sat on a mat while rain fell over quiet hills, and everyone said so.".split()
    for name in ("a.txt", "b.txt"):
        (essays / name).write_text(" ".join(rng.choice(words) for _ in range(3000)))
    (essays / "ignored.md").write_text("not a text file")
    corpus = (essays / "a.txt").read_text()
    server = serve(itl_s=0.0)
    for path in (write_byte_level_tokenizer(tmp_path / "bytes"),
                 write_merging_tokenizer(tmp_path / "bpe", corpus)):
        tok = transformers.AutoTokenizer.from_pretrained(path)
        lengths = [40, 257, 1000, 20000]  # 20000 > the haystack: it wraps around
        for text_dir in (None, str(essays)):
            cfg = config(server, prompt_lens=lengths, output_len=2, tokenizer=path, text_dir=text_dir)
            factory = loadtest.PromptFactory(cfg, nonce=123)
            prompts = [factory.make(i, n) for i, n in enumerate(lengths)]
            assert [len(tok.encode(p)) for p in prompts] == lengths, (path, text_dir)
            assert len({p[:16] for p in prompts}) == len(prompts)  # unique leading text
            if text_dir:
                assert "rain" in prompts[-1] and "not a text file" not in prompts[-1]
    # End to end with the byte-level tokenizer, whose count the fake server reproduces.
    result = loadtest.run(config(server, prompt_lens=[300, 500], output_len=2,
                                 tokenizer=str(tmp_path / "bytes"), text_dir=str(essays)))
    assert [r["prompt_tokens"] for r in result["requests"]] == [300, 500]


class MergingToyTokenizer:
    """Characters are tokens, except that "ab" is one token: decoding a slice and encoding the
    text again merges an "a" at the end of one piece with a "b" at the start of the next."""

    def encode(self, text, add_special_tokens=True):
        ids = [0] if add_special_tokens else []  # 0 = BOS
        i = 0
        while i < len(text):
            if text.startswith("ab", i):
                ids.append(1)
                i += 2
            else:
                ids.append(ord(text[i]) + 10)
                i += 1
        return ids

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=False):
        return "".join("ab" if t == 1 else "" if t == 0 else chr(t - 10) for t in ids)


def test_text_prompt_lengths_are_corrected_when_round_trips_merge():
    factory = loadtest.PromptFactory(loadtest.LoadTestConfig(), nonce=9)
    factory.tokenizer = tok = MergingToyTokenizer()
    factory.num_special = 1
    # Ends in "a" and starts with "b": where a prompt wraps around the haystack, the decoded
    # text merges the two into one token and the first attempt comes out one token short.
    factory.haystack = tok.encode("baab" * 40 + "a", add_special_tokens=False)
    checks = []
    real_encode = tok.encode
    tok.encode = lambda text, add_special_tokens=True: checks.append(1) or real_encode(text, add_special_tokens)
    corrected = 0
    for index, n in enumerate(range(100, 400, 7)):
        checks.clear()
        text = factory.make(index, n)
        assert len(real_encode(text)) == n
        assert text.startswith(f"00000009-{index:06d}: ")
        corrected += len(checks) > 2  # more than the prefix count and one check
    assert corrected > 0


def test_chat_endpoint_streams_deltas(serve, tmp_path):
    pytest.importorskip("transformers")
    server = serve(ttft_s=0.03, itl_s=0.005)
    result = loadtest.run(config(server, endpoint="chat", prompt_lens=[50], num_prompts=2,
                                 output_len=4, tokenizer=write_byte_level_tokenizer(tmp_path / "t")))
    assert result["endpoint"] == "/v1/chat/completions"
    ttfts = [r["ttft_ms"] for r in result["requests"]]
    assert result["completed"] == 2 and min(ttfts) >= 30 - 1 and min(ttfts) <= 30 + SLACK_MS
    assert isinstance(server.options.prompts[0], list) and server.options.prompts[0][0]["role"] == "user"


def test_without_usage_tokens_are_counted_from_chunks(serve):
    server = serve(send_usage=False, itl_s=0.0)
    result = loadtest.run(config(server, prompt_lens=[20], output_len=6))
    record = result["requests"][0]
    assert record["success"] and not record["usage_from_server"]
    assert record["output_tokens"] == 6 and record["prompt_tokens"] is None
    assert result["total_input_tokens"] == 20  # falls back to the target length


def test_arrival_schedules_are_seeded():
    poisson = loadtest.LoadTestConfig(arrival="poisson", request_rate=10.0)
    times = loadtest.plan_send_times(poisson, 4000, random.Random(1))
    assert times == loadtest.plan_send_times(poisson, 4000, random.Random(1))
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert sum(gaps) / len(gaps) == pytest.approx(0.1, rel=0.08)
    assert 0.8 < (sum((g - 0.1) ** 2 for g in gaps) / len(gaps)) ** 0.5 / 0.1 < 1.2  # exponential: sd = mean
    constant = loadtest.LoadTestConfig(arrival="constant", request_rate=4.0)
    assert loadtest.plan_send_times(constant, 3, random.Random(0)) == [0.0, 0.25, 0.5]
    ranged = loadtest.LoadTestConfig(prompt_len_range=(100, 200), num_prompts=50, seed=3)
    lengths = loadtest.request_lengths(ranged)
    assert lengths == loadtest.request_lengths(ranged) and all(100 <= n <= 200 for n in lengths)
    assert len(set(lengths)) > 10


def test_max_concurrency_caps_requests_in_flight(serve):
    server = serve(ttft_s=0.05, itl_s=0.0)
    result = loadtest.run(config(server, prompt_lens=[20], num_prompts=6, output_len=2,
                                 arrival="poisson", request_rate=math.inf, max_concurrency=2))
    spans = [(r["start_s"], r["start_s"] + r["e2el_ms"] / 1e3) for r in result["requests"]]
    in_flight = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert in_flight == 2
    assert result["duration"] >= 3 * 0.05  # three rounds of two


def test_json_output_names_and_console_summary(serve, tmp_path, capsys):
    server = serve(itl_s=0.002)
    out = tmp_path / "r.json"
    assert loadtest.main(["--base-url", server.base_url, "--random-input-len", "1K,2k",
                          "--num-prompts", "4", "--random-output-len", "3", "--label", "dense",
                          "--save-result", "--result-filename", str(out), "--disable-tqdm",
                          "--api-key", "sk-secret"]) == 0
    assert "sk-secret" not in out.read_text()  # the result file never carries the key
    data = json.loads(out.read_text())
    assert data["config"]["api_key"] == "<redacted>"
    assert VLLM_BENCH_NAMES <= set(data)
    assert VLLM_BENCH_NAMES <= set(data["by_prompt_len"]["1024"])
    assert set(data["by_prompt_len"]) == {"1024", "2048"}
    assert data["label"] == "dense" and data["model"] == "fake-model" and len(data["requests"]) == 4
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert lines[-1].split()[:3] == ["all", "4", "0"]


def test_bad_arguments_are_rejected(serve):
    with pytest.raises(ValueError, match="chat endpoint"):
        loadtest.LoadTestConfig(endpoint="chat").validate()
    with pytest.raises(ValueError, match="request_rate"):
        loadtest.LoadTestConfig(arrival="poisson", request_rate=0).validate()
    with pytest.raises(ValueError, match=">= 9"):
        loadtest.LoadTestConfig(prompt_lens=[4]).validate()
    assert loadtest.parse_token_list("8K,1M,100") == [8192, 1 << 20, 100]
    assert loadtest.parse_range("8K:128K") == (8192, 131072)


def sweep_like_result(path):
    path.write_text(json.dumps({"runs": [
        {"backend": "FLASH_ATTN", "prompt_len": 8192, "mean_ttft_ms": 400.0},
        {"backend": "FLASH_ATTN", "prompt_len": 32768, "mean_ttft_ms": 1200.0},
        {"backend": "proxyattn", "prompt_len": 8192, "mean_ttft_ms": 380.0},
        {"backend": "proxyattn", "prompt_len": 32768, "mean_ttft_ms": None}]}))
    return str(path)


def test_plot_of_result_files(serve, tmp_path):
    pytest.importorskip("matplotlib")
    server = serve(itl_s=0.0)
    result = str(tmp_path / "a.json")
    assert loadtest.main(["--base-url", server.base_url, "--random-input-len", "100,400",
                          "--random-output-len", "2", "--save-result", "--result-filename", result,
                          "--plot", str(tmp_path / "run.png"), "--disable-tqdm"]) == 0
    png = tmp_path / "both.png"
    assert loadtest.main(["--plot", str(png), result, sweep_like_result(tmp_path / "s.json")]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "run.png").stat().st_size > 1000


def test_plot_series_and_missing_matplotlib(tmp_path, monkeypatch, capsys):
    sweep = json.loads(open(sweep_like_result(tmp_path / "s.json")).read())
    assert loadtest.ttft_series(sweep, "x") == [("FLASH_ATTN", [(8192, 400.0), (32768, 1200.0)]),
                                               ("proxyattn", [(8192, 380.0)])]
    single = {"label": "", "by_prompt_len": {"200": {"mean_ttft_ms": 2.0}, "100": {"mean_ttft_ms": 1.0}}}
    assert loadtest.ttft_series(single, "file") == [("file", [(100, 1.0), (200, 2.0)])]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert loadtest.main(["--plot", str(tmp_path / "x.png"), str(tmp_path / "s.json")]) == 2
    assert "needs matplotlib" in capsys.readouterr().err


METRICS_TEXT = """# HELP vllm:inter_token_latency_seconds Histogram of inter-token latency in seconds.
# TYPE vllm:inter_token_latency_seconds histogram
vllm:inter_token_latency_seconds_bucket{engine="0",le="0.01",model_name="m"} 7.0
vllm:inter_token_latency_seconds_sum{engine="0",model_name="m"} 0.5
vllm:inter_token_latency_seconds_count{engine="0",model_name="m"} 50.0
vllm:inter_token_latency_seconds_sum{engine="1",model_name="m"} 0.25
vllm:inter_token_latency_seconds_count{engine="1",model_name="m"} 50.0
vllm:request_time_per_output_token_seconds_sum{engine="0",model_name="m"} 0.02
vllm:request_time_per_output_token_seconds_count{engine="0",model_name="m"} 2.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 9.0
"""


def test_server_histograms_are_summed_over_engines_and_differenced_between_snapshots():
    before = loadtest.parse_server_histograms(METRICS_TEXT)
    assert before == {"itl_sum": 0.75, "itl_count": 100.0, "tpot_sum": 0.02, "tpot_count": 2.0}
    after = dict(before, itl_sum=0.75 + 0.9, itl_count=100.0 + 100, tpot_sum=0.02 + 0.027, tpot_count=5.0)
    assert loadtest.server_latency_ms(before, after) == {
        "server_mean_itl_ms": pytest.approx(9.0), "server_mean_tpot_ms": pytest.approx(9.0)}
    # Missing snapshot (no /metrics), no finished request in between, or a metric not exposed.
    none = {"server_mean_itl_ms": None, "server_mean_tpot_ms": None}
    assert loadtest.server_latency_ms(None, after) == none
    assert loadtest.server_latency_ms(before, before) == none
    assert loadtest.server_latency_ms({}, {"itl_sum": 0.1, "itl_count": 10.0}) == {
        "server_mean_itl_ms": pytest.approx(10.0), "server_mean_tpot_ms": None}


def test_fetching_server_histograms_from_a_server_without_metrics_gives_none():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert loadtest.fetch_server_histograms(f"http://127.0.0.1:{port}", timeout_s=2) is None


def test_length_labels():
    assert [loadtest.length_label(n) for n in (32768, 262128, 1000, 8192 + 100, 64)] == [
        "32K", "~256K", "1000", "8292", "64"]


# ---------------------------------------------------------------------------------------------
# Command line: the flags of `vllm bench serve`, the older spellings, --help


def parse(*argv: str):
    return loadtest.build_parser().parse_args(list(argv))


def cli_config(*argv: str) -> loadtest.LoadTestConfig:
    return loadtest.build_config(parse(*argv))


def parser_exit(capsys, *argv: str, via_main: bool = False) -> str:
    """Exit status 2 from the argument parser; returns its message."""
    with pytest.raises(SystemExit) as exc:
        loadtest.main(list(argv)) if via_main else parse(*argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_cli_defaults_match_the_config_defaults(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert cli_config() == loadtest.LoadTestConfig()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    assert cli_config().api_key == "sk-from-env"
    assert cli_config("--api-key", "sk-flag").api_key == "sk-flag"


def test_vllm_bench_serve_flags_set_the_config(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = cli_config(
        "--host", "10.1.2.3", "--port", "9000", "--endpoint", "/v1/chat/completions",
        "--model", "m", "--random-input-len", "8K,32K", "--random-output-len", "64",
        "--random-range-ratio", "0.25", "--num-prompts", "12", "--request-rate", "2.5",
        "--max-concurrency", "3", "--num-warmups", "2", "--seed", "5", "--tokenizer", "tok",
        "--disable-tqdm", "--label", "x")
    assert cfg == loadtest.LoadTestConfig(
        base_url="http://10.1.2.3:9000", endpoint="chat", model="m", prompt_lens=[8192, 32768],
        output_len=64, input_range_ratio=0.25, output_range_ratio=0.25, num_prompts=12,
        arrival="poisson", request_rate=2.5, max_concurrency=3, warmup_requests=2, seed=5,
        tokenizer="tok", progress=False, label="x")
    # --base-url wins over --host/--port, as in vllm bench serve.
    assert cli_config("--base-url", "http://h:1", "--port", "2").base_url == "http://h:1"
    # vllm bench serve's general --input-len / --output-len name the same settings.
    assert cli_config("--input-len", "100", "--output-len", "7") == cli_config(
        "--random-input-len", "100", "--random-output-len", "7")
    assert cli_config("--random-output-len", "1K").output_len == 1024
    split = cli_config("--random-range-ratio", '{"input": 0.5, "output": 0}')
    assert (split.input_range_ratio, split.output_range_ratio) == (0.5, 0.0)
    assert cli_config("--no-ignore-eos").ignore_eos is False
    assert cli_config("--ignore-eos").ignore_eos is True
    for path, key in (("/v1/completions", "completions"), ("/v1/chat/completions", "chat"),
                      ("completions", "completions"), ("chat", "chat")):
        assert cli_config("--endpoint", path).endpoint == key


def test_old_spellings_are_hidden_aliases(capsys):
    old = cli_config("--prompt-lens", "100,200", "--prompt-len-range", "50:60", "--output-len", "3",
                     "--warmup-requests", "0", "--no-progress", "--endpoint", "chat")
    new = cli_config("--random-input-len", "100,200", "--input-len-range", "50:60",
                     "--random-output-len", "3", "--num-warmups", "0", "--disable-tqdm",
                     "--endpoint", "/v1/chat/completions")
    assert old == new
    assert (new.prompt_lens, new.prompt_len_range, new.output_len, new.warmup_requests,
            new.progress) == ([100, 200], (50, 60), 3, 0, False)
    assert parse("--output-json", "r.json").result_filename == "r.json"
    assert loadtest.saves_result(parse("--output-json", "r.json"))
    with pytest.raises(SystemExit):
        parse("--help")
    help_text = capsys.readouterr().out
    for hidden in ("--prompt-lens", "--prompt-len-range", "--warmup-requests", "--no-progress",
                   "--output-json"):
        assert hidden not in help_text
    for name in ("--random-input-len LENS, --input-len LENS",
                 "--random-output-len N, --output-len N", "--random-range-ratio", "--num-prompts",
                 "--request-rate", "--max-concurrency", "--num-warmups", "--save-result",
                 "--result-dir", "--result-filename", "--disable-tqdm", "--seed", "--base-url",
                 "--host", "--port", "--model",
                 "--endpoint", "--ignore-eos, --no-ignore-eos", "--input-len-range"):
        assert name in help_text


def test_help_describes_every_option_with_its_default(capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-do-not-print")
    with pytest.raises(SystemExit) as exc:
        loadtest.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for action in loadtest.build_parser()._actions:
        assert action.help and action.help.strip(), action.option_strings
    assert "sk-do-not-print" not in text  # the key is read at run time, never shown
    assert "(default: None)" not in text and "(default: )" not in text
    flat = " ".join(text.split())
    for shown in ("(default: 1024)", "(default: 16)", "(default: 0.0)", "(default: 1)",
                  "(default: 127.0.0.1)", "(default: 8000)", "(default: /v1/completions)",
                  "(default: cycle)", "(default: True)", "(default: 3600.0)",
                  "(default: one per --random-input-len length)"):
        assert shown in flat, shown
    assert "vllm bench serve" in text  # the epilog: where the meanings and defaults differ


def test_request_rate_alone_means_poisson_arrivals(capsys):
    assert (cli_config().arrival, cli_config().request_rate) == ("sequential", math.inf)
    cfg = cli_config("--request-rate", "4")
    assert (cfg.arrival, cfg.request_rate) == ("poisson", 4.0)
    cfg = cli_config("--request-rate", "inf")  # vllm bench serve's default: all at once
    assert cfg.arrival == "poisson"
    assert loadtest.plan_send_times(cfg, 3, random.Random(0)) == [0.0, 0.0, 0.0]
    cfg = cli_config("--arrival", "constant", "--request-rate", "2")
    assert (cfg.arrival, cfg.request_rate) == ("constant", 2.0)
    assert cli_config("--arrival", "poisson").request_rate == math.inf
    err = parser_exit(capsys, "--arrival", "sequential", "--request-rate", "2", via_main=True)
    assert "--request-rate needs --arrival poisson or constant" in err


def test_bad_flag_values_are_rejected(capsys):
    assert "random-range-ratio" in parser_exit(capsys, "--random-range-ratio", "wide")
    assert "random-range-ratio" in parser_exit(capsys, "--random-range-ratio", '{"input": 0.1}')
    assert "/v1/chat/completions" in parser_exit(capsys, "--endpoint", "/v1/embeddings")
    assert "--plot of this run needs --save-result" in parser_exit(
        capsys, "--plot", "x.png", via_main=True)
    # Values the parser accepts but the config refuses: one line, exit 2, nothing sent.
    for argv, message in (
            (["--random-range-ratio", "1.0"], "input_range_ratio 1.0: must be in [0, 1)"),
            (["--random-range-ratio", '{"input": 0, "output": -0.5}'], "output_range_ratio"),
            (["--input-len-range", "100:200", "--random-range-ratio", "0.5"], "give one"),
            (["--random-input-len", "12", "--random-range-ratio", "0.5"], ">= 9"),
            (["--max-concurrency", "0"], "max_concurrency 0")):
        assert loadtest.main(["--port", str(free_port()), *argv]) == 2
        assert message in capsys.readouterr().err, argv


def test_range_ratio_draws_lengths_as_vllm_bench_serve():
    cfg = loadtest.LoadTestConfig(prompt_lens=[1000, 4000], num_prompts=400, seed=1,
                                  input_range_ratio=0.2, output_len=16, output_range_ratio=0.25)
    lengths = loadtest.request_lengths(cfg)
    assert lengths == loadtest.request_lengths(cfg)  # seeded
    small, large = lengths[0::2], lengths[1::2]  # the nominal lengths still take turns
    assert 800 <= min(small) < 820 and 1180 < max(small) <= 1200
    assert 3200 <= min(large) < 3280 and 4720 < max(large) <= 4800
    assert loadtest.ratio_bounds(1000, 0.2) == (800, 1200)
    assert loadtest.ratio_bounds(15, 0.3) == (10, 20)  # floor and ceil
    outputs = loadtest.plan_output_lens(cfg, 400, random.Random(0))
    assert min(outputs) == 12 and max(outputs) == 20
    one = loadtest.LoadTestConfig(output_len=1, output_range_ratio=0.9)
    assert set(loadtest.plan_output_lens(one, 100, random.Random(0))) == {1, 2}  # never 0
    fixed = loadtest.LoadTestConfig(prompt_lens=[100, 200], num_prompts=4)
    assert loadtest.request_lengths(fixed) == [100, 200, 100, 200]
    assert loadtest.plan_output_lens(fixed, 3, random.Random(0)) == [16, 16, 16]


def test_range_ratio_end_to_end(serve):
    server = serve(itl_s=0.0)
    assert loadtest.main(["--base-url", server.base_url, "--random-input-len", "100",
                          "--random-output-len", "4", "--random-range-ratio", "0.5",
                          "--num-prompts", "20", "--num-warmups", "0", "--disable-tqdm"]) == 0
    assert all(50 <= len(p) <= 150 for p in server.options.prompts)
    assert len({len(p) for p in server.options.prompts}) > 5
    result = loadtest.run(config(server, prompt_lens=[100], num_prompts=20, output_len=4,
                                 output_range_ratio=0.5))
    outputs = [r["output_tokens"] for r in result["requests"]]
    assert all(2 <= n <= 6 for n in outputs) and len(set(outputs)) > 1


def test_request_body_ignore_eos_and_max_tokens():
    body = json.loads(loadtest.request_body(loadtest.LoadTestConfig(output_len=9), "m", [5, 6]))
    assert body["ignore_eos"] is True and body["max_tokens"] == 9 and body["prompt"] == [5, 6]
    body = json.loads(loadtest.request_body(cli_config("--no-ignore-eos"), "m", [5], max_tokens=3))
    assert body["ignore_eos"] is False and body["max_tokens"] == 3


def test_host_and_port_reach_the_server(serve, capsys):
    server = serve(itl_s=0.0)
    port = server.base_url.rsplit(":", 1)[1]
    assert loadtest.main(["--host", "127.0.0.1", "--port", port, "--random-input-len", "50",
                          "--random-output-len", "2", "--disable-tqdm"]) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1].split()[:3] == ["all", "1", "0"]


def test_save_result_names_and_places_the_file(serve, tmp_path, capsys, monkeypatch):
    server = serve(itl_s=0.0)
    common = ["--base-url", server.base_url, "--random-input-len", "50", "--random-output-len", "2",
              "--num-warmups", "0", "--disable-tqdm"]
    # --save-result alone: LABEL-MODEL-DATETIME.json in the current directory.
    monkeypatch.chdir(tmp_path)
    assert loadtest.main(common + ["--save-result", "--label", "my run"]) == 0
    (saved,) = tmp_path.glob("my_run-fake-model-*.json")
    assert VLLM_BENCH_NAMES <= set(json.loads(saved.read_text()))
    assert f"result written to {saved.name}" in capsys.readouterr().err
    # --result-dir alone saves too (directory created), with the default name.
    assert loadtest.main(common + ["--result-dir", str(tmp_path / "a" / "b")]) == 0
    (saved,) = (tmp_path / "a" / "b").glob("loadtest-fake-model-*.json")
    data = json.loads(saved.read_text())
    assert data["config"]["output_len"] == 2 and data["config"]["warmup_requests"] == 0
    # --result-filename inside --result-dir.
    assert loadtest.main(common + ["--result-dir", "c", "--result-filename", "r.json"]) == 0
    assert (tmp_path / "c" / "r.json").is_file()
    # Without any of them nothing is written.
    before = sorted(p.name for p in tmp_path.iterdir())
    assert loadtest.main(common) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    now = datetime.datetime(2026, 1, 2, 3, 4, 5)
    assert loadtest.result_path(parse(), "meta-llama/Llama-3.1-8B", now) == \
        "loadtest-Llama-3.1-8B-20260102-030405.json"
    assert loadtest.result_path(parse("--result-dir", "d", "--label", "a/b c"), "m", now) == \
        os.path.join("d", "a_b_c-m-20260102-030405.json")
