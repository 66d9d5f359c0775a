"""Concurrent embedding calls share inference requests (services.memory.coalesce): each caller gets
its own vectors, an idle call goes alone and at once, and one bad text fails only its own call."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from services.memory.coalesce import CoalescingEmbedder

pytestmark = pytest.mark.timeout(30)


class Unavailable(Exception):
    retryable = True


class BadText(Exception):
    retryable = False


class Inference:
    """A stand-in for the inference service: one vector per text, [len(text), index in its request];
    each request blocks until ``gate`` is set, so callers pile up behind it."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.requests: list[list[str]] = []
        self.classes: list[str] = []
        self.lock = threading.Lock()
        self.fail: Exception | None = None

    def __call__(self, texts: list[str], latency_class: str) -> Sequence[Sequence[float]]:
        with self.lock:
            self.requests.append(list(texts))
            self.classes.append(latency_class)
        self.gate.wait(10)
        if self.fail is not None:
            raise self.fail
        if any(t == "bad" for t in texts):
            raise BadText("text 'bad' is not allowed")
        return [[float(len(t)), float(i)] for i, t in enumerate(texts)]


def test_a_lone_call_goes_at_once_and_alone() -> None:
    inference = Inference()
    inference.gate.set()
    embed = CoalescingEmbedder(inference, max_in_flight=1)
    assert embed(["abc"], "interactive") == [[3.0, 0.0]]
    assert inference.requests == [["abc"]]


def test_callers_queued_behind_a_request_share_the_next_one_and_get_their_own_vectors() -> None:
    inference = Inference()
    embed = CoalescingEmbedder(inference, max_in_flight=1)
    texts = ["x" * (i + 1) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        first = pool.submit(embed, [texts[0]], "interactive")
        while not inference.requests:  # the first call is in flight; the others queue behind it
            time.sleep(0.001)
        rest = [pool.submit(embed, [t], "interactive") for t in texts[1:]]
        while sum(len(r) for r in inference.requests) < 1:
            time.sleep(0.001)
        inference.gate.set()
        answers = [first.result()] + [f.result() for f in rest]
    assert [a[0][0] for a in answers] == [float(len(t)) for t in texts]  # each caller its own text's vector
    assert sorted(t for r in inference.requests for t in r) == sorted(texts)  # each text embedded once
    assert len(inference.requests) < len(texts)  # and in fewer requests than callers


def test_one_bad_text_fails_only_its_own_call() -> None:
    inference = Inference()
    embed = CoalescingEmbedder(inference, max_in_flight=1)
    with ThreadPoolExecutor(4) as pool:
        blocker = pool.submit(embed, ["first"], "interactive")
        while not inference.requests:
            time.sleep(0.001)
        good, bad = pool.submit(embed, ["good"], "interactive"), pool.submit(embed, ["bad"], "interactive")
        inference.gate.set()
        assert blocker.result() == [[5.0, 0.0]]
        assert good.result()[0][0] == 4.0
        with pytest.raises(BadText):
            bad.result()


def test_a_retryable_failure_reaches_every_caller_of_the_request() -> None:
    inference = Inference()
    inference.fail = Unavailable("inference restarting")
    inference.gate.set()
    embed = CoalescingEmbedder(inference, max_in_flight=1)
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(embed, [f"t{i}"], "interactive") for i in range(8)]
        for f in futures:
            with pytest.raises(Unavailable):
                f.result()


def test_latency_classes_never_share_a_request() -> None:
    inference = Inference()
    embed = CoalescingEmbedder(inference, max_in_flight=1)
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(embed, [f"t{i}"], "interactive" if i % 2 else "bulk") for i in range(8)]
        while len(inference.requests) < 2:  # one request of each class in flight, the rest queued
            time.sleep(0.001)
        inference.gate.set()
        for f in futures:
            f.result()
    for latency_class, texts in zip(inference.classes, inference.requests, strict=True):
        assert {"interactive" if int(t[1:]) % 2 else "bulk" for t in texts} == {latency_class}
    assert len(inference.requests) < 8
    assert sorted(t for r in inference.requests for t in r) == sorted(f"t{i}" for i in range(8))
