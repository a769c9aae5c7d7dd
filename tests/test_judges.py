import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from riskexp.judges import (
    HARMLESSNESS_SYSTEM_PROMPT,
    HELPFULNESS_SYSTEM_PROMPT,
    HELPFULNESS_USER_TEMPLATE,
    JUDGE_PROMPTS,
    ChatJudge,
    Judge,
    JudgeError,
    ScorerJudge,
    check_judgement,
    check_user_template,
    outcomes,
    parse_scores,
)

KEY_ENV = "RISKEXP_TEST_JUDGE_KEY"

# ----------------------------------------------------------------------------------------------- outcomes


def test_outcomes_both_directions_and_ties():
    a = torch.tensor([1.0, 2.0, 3.0])
    b = torch.tensor([2.0, 2.0, 1.0])
    out = outcomes(a, b)
    assert out.dtype == torch.float64
    assert out.tolist() == [0.0, 0.5, 1.0]
    assert outcomes(a, b, higher_is_better=False).tolist() == [1.0, 0.5, 0.0]
    assert outcomes(b, a).tolist() == [1.0, 0.5, 0.0]  # swapping the sides mirrors the outcome


def test_outcomes_any_shape_and_shape_errors():
    a = torch.tensor([[1, 5], [3, 3]])
    b = torch.tensor([[2, 4], [3, 0]])
    assert outcomes(a, b).tolist() == [[0.0, 1.0], [0.5, 1.0]]
    assert outcomes(torch.tensor(1.0), torch.tensor(1.0)).item() == 0.5
    with pytest.raises(ValueError, match=r"same shape, got \(2, 2\) and \(4,\)"):
        outcomes(a, b.flatten())


# ---------------------------------------------------------------------------------------- check_judgement


def test_check_judgement_accepts_and_converts():
    out = check_judgement([1, 0.5, 0.0, 2 / 3], 4, "j")
    assert out.dtype == torch.float64 and out.shape == (4,)
    assert check_judgement(torch.tensor([0.25], dtype=torch.float32), 1, "j").item() == 0.25
    assert check_judgement(torch.zeros(0), 0, "j").shape == (0,)


@pytest.mark.parametrize(
    "values, match",
    [
        (torch.zeros(3), r"judge 'my_judge' returned shape \(3,\) for 2 pairs"),
        (torch.zeros(2, 1), r"judge 'my_judge' returned shape \(2, 1\) for 2 pairs"),
        (torch.tensor([0.5, 1.5]), r"judge 'my_judge' returned 1.5 for pair 1; .*\[0, 1\]"),
        (torch.tensor([-0.1, 0.5]), r"returned -0.1 for pair 0"),
        (torch.tensor([0.5, float("nan")]), r"returned nan for pair 1; each value must be finite"),
        (["a", "b"], r"judge 'my_judge' returned list, expected a tensor of 2 values"),
    ],
)
def test_check_judgement_errors_name_the_judge(values, match):
    with pytest.raises(ValueError, match=match):
        check_judgement(values, 2, "my_judge")


# -------------------------------------------------------------------------------------------- ScorerJudge


class LengthScorer:
    """Fake scorer: the completion's length, as a reward or a cost; counts its calls."""

    name = "length"

    def __init__(self, kind="reward"):
        self.kind = kind
        self.calls = 0

    def __call__(self, prompts, completions):
        self.calls += 1
        assert len(prompts) == len(completions)
        return torch.tensor([float(len(c)) for c in completions])


PROMPTS = ["p1", "p2", "p3"]
LONG_SHORT = (["long answer", "same", "x"], ["short", "four", "a longer one"])


def test_scorer_judge_reward_prefers_higher():
    scorer = LengthScorer("reward")
    judge = ScorerJudge(scorer)
    assert judge.higher_is_better is True and judge.name == "length_judge"
    out = judge(PROMPTS, *LONG_SHORT)
    assert out.dtype == torch.float64
    assert out.tolist() == [1.0, 0.5, 0.0]
    assert scorer.calls == 1  # both response lists in one call
    assert isinstance(judge, Judge)


def test_scorer_judge_cost_prefers_lower_and_override():
    assert ScorerJudge(LengthScorer("cost"))(PROMPTS, *LONG_SHORT).tolist() == [0.0, 0.5, 1.0]
    forced = ScorerJudge(LengthScorer("cost"), higher_is_better=True, name="longer")
    assert forced.name == "longer"
    assert forced(PROMPTS, *LONG_SHORT).tolist() == [1.0, 0.5, 0.0]


def test_scorer_judge_plain_function_needs_direction():
    def n_words(prompts, completions):
        return torch.tensor([float(len(c.split())) for c in completions])

    with pytest.raises(ValueError, match=r"scorer 'n_words' has kind None.*higher_is_better"):
        ScorerJudge(n_words)
    judge = ScorerJudge(n_words, higher_is_better=False)
    assert judge(["p"], ["one two"], ["one"]).tolist() == [0.0]
    with pytest.raises(TypeError, match="callable scorer"):
        ScorerJudge("not a scorer")


def test_scorer_judge_input_errors():
    judge = ScorerJudge(LengthScorer())
    with pytest.raises(ValueError, match=r"'length_judge': inputs of different lengths"):
        judge(["p", "q"], ["a", "b"], ["c"])
    with pytest.raises(TypeError, match=r"responses_b\[1\] is NoneType"):
        judge(["p", "q"], ["a", "b"], ["c", None])
    with pytest.raises(TypeError, match="not a single str"):
        judge("p", "a", "b")
    assert judge([], [], []).shape == (0,)

    bad = ScorerJudge(lambda p, c: torch.zeros(1), higher_is_better=True, name="bad")
    with pytest.raises(ValueError, match=r"judge 'bad': its scorer returned 1 scores for 4 responses"):
        bad(["p", "q"], ["a", "b"], ["c", "d"])


@pytest.mark.parametrize("target, higher", [("SafetyReward", True), ("SafetyCost", False)])
def test_scorer_judge_from_hydra(target, higher):
    cfg = OmegaConf.create(
        {"_target_": "riskexp.judges.ScorerJudge", "scorer": {"_target_": f"riskexp.scorers.{target}"}}
    )
    judge = instantiate(cfg)
    assert isinstance(judge, ScorerJudge)
    assert type(judge.scorer).__name__ == target
    assert judge.higher_is_better is higher


# ------------------------------------------------------------------------------------ prompts and parsing


def test_parse_scores():
    assert parse_scores("8 3\nAnswer 1 is better because") == (8.0, 3.0)
    assert parse_scores("  \n7.5, 2.\n") == (7.5, 2.0)
    assert parse_scores("10 10") == (10.0, 10.0)
    for reply in ["Assistant 1: 7", "7/10 4/10", "8", "", "8 3 2", "eight three"]:
        with pytest.raises(ValueError, match="cannot read two scores"):
            parse_scores(reply)


def test_prompts_and_template_checks():
    assert set(JUDGE_PROMPTS) == {"helpfulness", "harmlessness"}
    for system, user in JUDGE_PROMPTS.values():
        assert check_user_template(user) == user
        assert "impartial judge" in system
        assert "first line" in user and "1 to 10" in user
    filled = HELPFULNESS_USER_TEMPLATE.format(question="Q?", answer_1="A {1}", answer_2="B")
    assert "Q?" in filled and "A {1}" in filled and filled.index("A {1}") < filled.index("\nB\n")
    with pytest.raises(ValueError, match=r"fields \['answer_1', 'question'\]"):
        check_user_template("{question} {answer_1}")
    with pytest.raises(ValueError, match=r"fields \['answer_1', 'answer_2', 'extra', 'question'\]"):
        check_user_template("{question} {answer_1} {answer_2} {extra}")
    with pytest.raises(ValueError, match="not a valid str.format template"):
        check_user_template("{question} {answer_1} {answer_2} {")


# --------------------------------------------------------------------------------------- ChatJudge server


def chat_reply(content):
    return 200, {"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


def marker_reply(body, headers, count):
    """Scores 9 for the answer containing GOOD and 2 for the one containing BAD, in the order shown."""
    user = body["messages"][1]["content"]
    return chat_reply("9 2\nexplanation" if user.index("GOOD") < user.index("BAD") else "2 9\nexplanation")


class FakeChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), FakeChatHandler)
        self.reply = marker_reply
        self.requests = []  # (path, headers, body)
        self.lock = threading.Lock()

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class FakeChatHandler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            count = len(self.server.requests)
            self.server.requests.append((self.path, dict(self.headers), body))
        if self.path != "/v1/chat/completions":
            status, payload = 404, {"error": {"message": f"no route {self.path}"}}
        else:
            status, payload = self.server.reply(body, self.headers, count)
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = FakeChatServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def local_judge(server, **kw):
    return ChatJudge(**{"model": "judge-model", "base_url": server.base_url, "api_key_env": None, **kw})


def test_chat_judge_request_body_and_mapping(server):
    judge = local_judge(server, repeats=1, temperature=0.3, max_tokens=5)
    out = judge(["Which is better?", "Second question"], ["GOOD one", "BAD two"], ["BAD one", "GOOD two"])
    assert out.dtype == torch.float64
    assert out.tolist() == [1.0, 0.0]
    assert len(server.requests) == 4 and judge.requests == 4 and judge.failures == 0
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions"
    assert headers["Content-Type"] == "application/json" and "Authorization" not in headers
    assert body["model"] == "judge-model" and body["temperature"] == 0.3 and body["max_tokens"] == 5
    system, user = body["messages"]
    assert system == {"role": "system", "content": HELPFULNESS_SYSTEM_PROMPT}
    assert user["role"] == "user"
    users = [b["messages"][1]["content"] for _, _, b in server.requests]
    # each pair once in each order
    q1 = sorted(u for u in users if "Which is better?" in u)
    assert len(q1) == 2 and all("GOOD one" in u and "BAD one" in u for u in q1)
    assert sorted(u.index("GOOD one") < u.index("BAD one") for u in q1) == [False, True]


def test_chat_judge_defaults_follow_sacpo(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")
    judge = ChatJudge("gpt-4-0125-preview", base_url=server.base_url + "/", api_key_env=KEY_ENV)
    assert (judge.temperature, judge.max_tokens, judge.repeats, judge.both_orders) == (0.7, 8, 3, True)
    assert judge.url == server.base_url + "/chat/completions"
    assert judge(["q"], ["GOOD"], ["BAD"]).tolist() == [1.0]
    assert len(server.requests) == 6  # 3 repeats x 2 orders
    body = server.requests[0][2]
    assert body["model"] == "gpt-4-0125-preview" and body["temperature"] == 0.7 and body["max_tokens"] == 8
    assert all(h["Authorization"] == "Bearer sk-test" for _, h, _ in server.requests)
    assert "sk-test" not in repr(judge)


def test_chat_judge_harmlessness_prompt(server):
    local_judge(server, aspect="harmlessness", repeats=1)(["q"], ["GOOD"], ["BAD"])
    assert server.requests[0][2]["messages"][0]["content"] == HARMLESSNESS_SYSTEM_PROMPT


def test_chat_judge_position_bias_cancels_in_both_orders(server):
    server.reply = lambda body, headers, count: chat_reply("8 3")  # always prefers the answer shown first
    both = local_judge(server, repeats=2)
    assert both(["q1", "q2"], ["GOOD", "BAD"], ["BAD", "GOOD"]).tolist() == [0.5, 0.5]
    one_order = local_judge(server, repeats=2, both_orders=False)
    assert one_order(["q1", "q2"], ["GOOD", "BAD"], ["BAD", "GOOD"]).tolist() == [1.0, 1.0]


def test_chat_judge_mean_over_repeats(server):
    replies = ["9 2", "9 2", "2 9", "5 5"]
    server.reply = lambda body, headers, count: chat_reply(replies[count % 4])
    judge = local_judge(server, repeats=4, both_orders=False, max_workers=1)  # one worker: replies in order
    assert judge(["q"], ["a"], ["b"]).tolist() == [pytest.approx((1 + 1 + 0 + 0.5) / 4)]
    assert len(server.requests) == 4


def test_chat_judge_concurrent_requests_map_back(server):
    n = 12
    a = ["GOOD" if i % 3 else "BAD" for i in range(n)]
    b = ["BAD" if i % 3 else "GOOD" for i in range(n)]
    out = local_judge(server, repeats=2, max_workers=6)([f"q{i}" for i in range(n)], a, b)
    assert out.tolist() == [0.0 if i % 3 == 0 else 1.0 for i in range(n)]
    assert len(server.requests) == n * 4


def test_chat_judge_malformed_reply_is_a_counted_tie(server, caplog):
    def reply(body, headers, count):
        user = body["messages"][1]["content"]
        return chat_reply("9 2") if user.index("GOOD") < user.index("BAD") else chat_reply("I cannot decide")

    server.reply = reply
    judge = local_judge(server, repeats=1)
    with caplog.at_level(logging.WARNING, logger="riskexp.judges"):
        out = judge(["q"], ["GOOD"], ["BAD"])
    assert out.tolist() == [0.75]  # a wins in its order (1), the swapped order failed (tie, 0.5)
    assert judge.failures == 1 and judge.requests == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "1 of 2 requests failed" in warnings[0] and "I cannot decide" in warnings[0]
    judge(["q"], ["GOOD"], ["BAD"])
    assert judge.failures == 2 and judge.requests == 4  # accumulated over calls


def test_chat_judge_bad_json_and_http_errors_are_ties(server):
    def reply(body, headers, count):
        replies = [(200, b"not json"), (500, {"error": "boom"}), (200, {"choices": []}), chat_reply("7 3")]
        return replies[count]

    server.reply = reply
    judge = local_judge(server, repeats=4, both_orders=False, max_workers=1, retries=0)
    assert judge(["q"], ["a"], ["b"]).tolist() == [pytest.approx((0.5 + 0.5 + 0.5 + 1.0) / 4)]
    assert judge.failures == 3


def test_chat_judge_all_failures_raise(server):
    server.reply = lambda body, headers, count: chat_reply("no scores here")
    judge = local_judge(server, repeats=1)
    match = r"all 4 requests to .*/v1/chat/completions .*'judge-model'.*no scores"
    with pytest.raises(JudgeError, match=match):
        judge(["q1", "q2"], ["a", "b"], ["c", "d"])
    assert judge.failures == 4


def test_chat_judge_wrong_key_and_wrong_url_raise(server, monkeypatch):
    def reply(body, headers, count):
        if headers.get("Authorization") != "Bearer right":
            return 401, {"error": {"message": "Incorrect API key provided"}}
        return chat_reply("9 2")

    server.reply = reply
    monkeypatch.setenv(KEY_ENV, "wrong")
    judge = ChatJudge("m", base_url=server.base_url, api_key_env=KEY_ENV, repeats=1)
    with pytest.raises(JudgeError, match="HTTP 401.*Incorrect API key"):
        judge(["q"], ["a"], ["b"])
    monkeypatch.setenv(KEY_ENV, "right")
    right = ChatJudge("m", base_url=server.base_url, api_key_env=KEY_ENV, repeats=1)
    assert right(["q"], ["a"], ["b"]).tolist() == [0.5] and right.failures == 0  # "9 2" in both orders

    wrong_path = ChatJudge("m", base_url=server.base_url + "/extra", api_key_env=None, repeats=1)
    with pytest.raises(JudgeError, match="HTTP 404"):
        wrong_path(["q"], ["a"], ["b"])

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nowhere = ChatJudge("m", base_url=f"http://127.0.0.1:{port}/v1", api_key_env=None, repeats=1, timeout=5)
    with pytest.raises(JudgeError, match="all 2 requests"):
        nowhere(["q"], ["a"], ["b"])


def test_chat_judge_retries_rate_limits(server):
    def reply(body, headers, count):
        return (429, {"error": "slow down"}) if count == 0 else chat_reply("9 2")

    server.reply = reply
    judge = local_judge(server, repeats=1, both_orders=False, retries=1, retry_wait=0.0)
    assert judge(["q"], ["a"], ["b"]).tolist() == [1.0]
    assert judge.failures == 0 and len(server.requests) == 2


def test_chat_judge_custom_prompts(server):
    template = "Q: {question}\n1) {answer_1}\n2) {answer_2}\nScores?"
    judge = local_judge(
        server, repeats=1, both_orders=False, system_prompt="Be fair.", user_template=template
    )
    assert judge(["what?"], ["GOOD"], ["BAD"]).tolist() == [1.0]
    system, user = server.requests[0][2]["messages"]
    assert system["content"] == "Be fair." and user["content"] == "Q: what?\n1) GOOD\n2) BAD\nScores?"
    with pytest.raises(ValueError, match="user_template has fields"):
        local_judge(server, user_template="{question} {answer_1}")


def test_chat_judge_missing_api_key(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=f"environment variable '{KEY_ENV}'.*api_key_env=None"):
        ChatJudge("gpt-4-0125-preview", api_key_env=KEY_ENV)
    monkeypatch.setenv(KEY_ENV, "")
    with pytest.raises(ValueError, match=KEY_ENV):
        ChatJudge("gpt-4-0125-preview", api_key_env=KEY_ENV)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"aspect": "honesty"}, r"aspect='honesty' is not accepted: one of \('helpfulness', 'harmlessness"),
        ({"repeats": 0}, r"repeats=0 is not accepted: an integer > 0"),
        ({"max_tokens": 2.5}, r"max_tokens=2.5 is not accepted: an integer > 0"),
        ({"temperature": -1}, r"temperature=-1 is not accepted: a number >= 0"),
        ({"max_workers": True}, r"max_workers=True is not accepted"),
        ({"retries": -1}, r"retries=-1 is not accepted: an integer >= 0"),
        ({"base_url": "file:///etc"}, r"base_url='file:///etc' is not accepted: an http:// or https:// URL"),
        ({"model": ""}, r"model='' is not accepted"),
    ],
)
def test_chat_judge_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        ChatJudge(**{"model": "m", "api_key_env": None, **kw})


def test_chat_judge_from_hydra_and_empty_input():
    cfg = OmegaConf.create(
        {"_target_": "riskexp.judges.ChatJudge", "model": "local", "base_url": "http://127.0.0.1:1/v1",
         "api_key_env": None, "aspect": "harmlessness"}
    )
    judge = instantiate(cfg)
    assert isinstance(judge, ChatJudge) and isinstance(judge, Judge) and judge.name == "harmlessness_judge"
    assert judge([], [], []).shape == (0,) and judge.requests == 0  # no requests, no error
