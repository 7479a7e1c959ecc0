"""The default sampling (Ollama / llama.cpp's) and the loop guards: repetition penalty, n-gram ban."""
import numpy as np

from spark_lab.llm import SamplingParams, sample
from spark_lab.llm.sampling import banned_by_ngrams


def test_defaults_are_the_usual_ones():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p) == (0.7, 40, 0.9, 0.05)
    assert (p.repetition_penalty, p.repeat_last_n, p.seed) == (1.1, 64, 0)
    # greedy stays the model's argmax unless a penalty is asked for (llama.cpp --temp 0 parity)
    assert SamplingParams(temperature=0).repetition_penalty == 1.0
    assert SamplingParams(temperature=0, repetition_penalty=1.3).repetition_penalty == 1.3


def test_penalty_window_is_the_last_n_tokens():
    logits = np.array([2.0, 1.9, 0.0], np.float32)
    p = SamplingParams(temperature=0, repetition_penalty=1.1, repeat_last_n=2)
    rng = np.random.default_rng(0)
    assert sample(logits, p, rng, recent=[0, 2, 2]) == 0          # token 0 is older than the window
    assert sample(logits, p, rng, recent=[2, 0]) == 1             # 2.0 / 1.1 = 1.82 < 1.9


def test_no_repeat_ngram_ban():
    g = [5, 6, 7, 1, 5, 6]
    assert banned_by_ngrams(g, 3) == [7]                         # "5 6 7" was seen: 7 may not follow "5 6"
    assert banned_by_ngrams(g, 2) == [7]                         # after 6 came 7 once
    assert banned_by_ngrams(g, 0) == [] and banned_by_ngrams([1, 2], 3) == []
    logits = np.zeros(10, np.float32)
    logits[7] = 5.0
    p = SamplingParams(temperature=0, no_repeat_ngram_size=3)
    assert sample(logits, p, np.random.default_rng(0), recent=g, generated=g) != 7
    # the ban looks at the output only: the same n-gram in the prompt is allowed
    assert sample(logits, p, np.random.default_rng(0), recent=g, generated=[]) == 7


def test_default_seed_repeats_a_draw():
    logits = np.log(np.array([0.4, 0.35, 0.25], np.float32))
    draws = [sample(logits, SamplingParams(), np.random.default_rng(SamplingParams().seed)) for _ in range(5)]
    assert len(set(draws)) == 1


def test_extreme_penalty_and_non_finite_logits_still_draw_a_token():
    """Found by `make fuzz` on the server: repetition_penalty = 7.6e-178 overflowed float32 to +inf logits,
    the probabilities became NaN and the draw raised IndexError (a 500). +inf tokens share the probability,
    NaN is never drawn, all-impossible falls back to the argmax."""
    rng = np.random.default_rng(0)
    logits = np.array([-3.0, 1.0, -2.0, 0.5], np.float32)
    p = SamplingParams(temperature=0.8, repetition_penalty=7.6e-178, top_k=0, top_p=1.0, min_p=0.0)
    draws = {sample(logits, p, rng, recent=[1, 3]) for _ in range(200)}
    assert draws == {1, 3}                                       # both overflowed to +inf, both drawn
    nan = np.array([np.nan, 0.0, np.nan, -1.0], np.float32)
    assert {sample(nan, SamplingParams(), rng) for _ in range(200)} <= {1, 3}
    all_bad = np.array([np.nan, -np.inf, np.nan], np.float32)
    assert sample(all_bad, SamplingParams(), rng) in (0, 1, 2)
