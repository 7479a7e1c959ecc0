"""Generated text must not loop (spark_lab.llm.repetition: no 4-word phrase a third time, no 10-word
run twice, no phrase of 2-8 words twice in a row) in an answer, a haiku or a summary, nor in the
outputs stored in the notebooks. Also the demo questions' pass rate with the default
sampling (measured: see DEMO_RATE). The tests marked slow take 15-60 s each on one quiet thread.

Against the old behaviour (greedy, no penalty, no summary guards) test_summary_does_not_loop and
test_readme_hybrid_summary_does_not_loop fail ("The keepers: The keepers The keepers:", "a
server-based chatbot," thirty times), and test_greedy_loops_so_the_check_bites shows the welcome
question's greedy answer is flagged."""
import json
from pathlib import Path

import pytest

from spark_lab.benchmarks import questions as Q
from spark_lab.llm.repetition import has_loop, loop_report, max_ngram_repeats, trim_loop
from spark_lab.models import ModelNotFound, resolve

ROOT = Path(__file__).resolve().parents[1]
# measured with the default sampling and the demo system prompt (`spark-lab bench questions --repeats N`):
# 81/100 over seeds 0-4 (75-90% per seed) on 2026-12-04 16:40; 31/40 over seeds 0-1 (70%, 85%) after the
# f16 KV-cache/decode changes of 17:30 (sampled answers move with the engine's rounding). The test runs
# seeds 0 and 1.
DEMO_RATE = 0.78
MARGIN = 0.13


# ------------------------------------------------------------------------------ the detector

def test_detector_counts_and_trims():
    assert max_ngram_repeats("a b c d a b c d a b c d", 4) == ("a b c d", 3)
    assert max_ngram_repeats("too short", 4) == ("", 0)
    # real greedy SmolLM2 output: a phrase a third time, a stutter, a sentence written again
    assert has_loop("L'Étoile, la Marseillaise, la femme au roi, la femme au roi, la femme au roi,")
    assert has_loop("The Fresnel lens is a marvel. The keepers: The keepers The keepers: The lights")
    again = "The text is divided into two paragraphs, with each paragraph focusing on a different part"
    assert has_loop(f"{again}. It keeps the main facts. {again}.")
    # not loops: a name twice, a sentence ending and the next starting with the same words
    assert not has_loop("The capital of France is Paris. Paris is on the Seine. Paris is old.")
    assert not has_loop("It is one part of the text. The text is short. The harbour authority met the "
                        "harbour authority of the next town.")
    assert trim_loop("The keepers: The keepers: The keepers: The keepers: the light.") == "The keepers"
    text = "Paris is the capital. It is on the Seine. It is on the Seine. It is on"
    assert trim_loop(text) == "Paris is the capital. It is on the Seine."
    assert trim_loop("No loop here at all.") == "No loop here at all."
    assert loop_report("No loop here.") == "" and "femme" in loop_report("la femme au roi, la femme au roi")


# ------------------------------------------------------------------------------ notebooks

def _stored_texts(nb: Path):
    for cell in json.loads(nb.read_text())["cells"]:
        for out in cell.get("outputs", []):
            text = out.get("text") or out.get("data", {}).get("text/plain") or ""
            yield "".join(text) if isinstance(text, list) else text


def test_notebook_outputs_do_not_loop():
    nbs = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert nbs
    for nb in nbs:
        for text in _stored_texts(nb):
            assert not has_loop(text), f"{nb.name}: a stored output {loop_report(text)}"


# ------------------------------------------------------------------------------ fresh generations

@pytest.fixture(scope="module")
def smollm():
    try:
        resolve("smollm2-135m-instruct", kind="llm")
    except ModelNotFound as e:
        pytest.skip(str(e))
    from spark_lab.device import set_threads
    from spark_lab.llm import LLM
    set_threads(1)
    return LLM.load("smollm2-135m-instruct", n_ctx=1024)


@pytest.fixture(scope="module")
def demo_rows(smollm):
    return Q.evaluate(smollm, Q.load_questions(), seeds=(0, 1))


def test_demo_question_set():
    qs = Q.load_questions()
    assert 15 <= len(qs) <= 25
    assert len({q["question"] for q in qs}) == len(qs)
    assert Q.passes("The capital of France is Paris.", qs[0]) and not Q.passes("It is Lyon.", qs[0])


@pytest.mark.slow
def test_demo_questions_pass_rate(demo_rows):
    rate = Q.pass_rate(demo_rows)
    failed = [(r["question"], r["answer"]) for r in demo_rows if not r["passed"]]
    assert rate >= DEMO_RATE - MARGIN, f"pass rate {rate:.0%}; failed: {failed}"


@pytest.mark.slow
def test_demo_answers_do_not_loop(demo_rows):
    for r in demo_rows:
        assert not has_loop(r["answer"]), f"{r['question']!r}: {loop_report(r['answer'])} in {r['answer']!r}"


def test_notebook_questions_are_answered(smollm):
    """The questions notebooks 00 and 03 and the browser test ask are in the set and answered well:
    on at least 5 of seeds 0-7 (a sampled answer moves when the engine's rounding does: on a Zen 3
    box the mountain question failed seeds 0 and 2 and passed 1 and 3-9)."""
    qs = {q["question"]: q for q in Q.load_questions()}
    asked = ["What is the capital of France?",               # 00_welcome
             "What is the capital of Japan?",                # tests/browser/test_jupyterlab.py
             "What language is spoken in Brazil?",           # 03_chatbot, the streamed answer
             "What is the tallest mountain in the world?"]   # 03_chatbot, the conversation
    for question in asked:
        assert question in qs
        answers = [smollm.chat(Q.demo_messages(question), max_new_tokens=Q.MAX_NEW_TOKENS, seed=seed).text
                   for seed in range(8)]
        assert sum(Q.passes(a, qs[question]) for a in answers) >= 5, answers


def test_haiku_does_not_loop(smollm):
    g = smollm.generate("Write a haiku about the sea.", max_new_tokens=64)
    assert not has_loop(g.text), f"{loop_report(g.text)} in {g.text!r}"


def test_greedy_loops_so_the_check_bites(smollm):
    """The old default (greedy, no penalty) loops on the welcome question: the detector flags it."""
    g = smollm.generate("What is the capital of France?", max_new_tokens=40, temperature=0)
    assert has_loop(g.text), g.text


@pytest.mark.slow
def test_summary_does_not_loop():
    """Notebook 05's abstractive summary (SmolLM2 with a 512-token context, 80 words of the lighthouse
    article): greedy without the guards it wrote "The keepers: The keepers The keepers: ..."."""
    try:
        resolve("smollm2-135m-instruct", kind="llm")
    except ModelNotFound as e:
        pytest.skip(str(e))
    from spark_lab import summarize as S
    from spark_lab.llm import LLM
    llm = LLM.load("smollm2-135m-instruct", n_ctx=512)
    text = S.read_document(ROOT / "tests" / "data" / "summaries" / "02_lighthouses.md")
    s = S.summarize(text, "abstractive", max_words=80, llm=llm, progress=False)
    assert s.words_out >= 20 and not has_loop(s.text), f"{loop_report(s.text)} in {s.text!r}"


@pytest.mark.slow
def test_readme_hybrid_summary_does_not_loop():
    """`spark-lab summarize --method hybrid README.md` (150 words, the engine's default context):
    greedy without the guards it wrote "a server-based chatbot," thirty times; with them the phrase
    still comes twice and the summary is cut there (one sentence, about 35 words). About a minute."""
    try:
        resolve("smollm2-135m-instruct", kind="llm")
    except ModelNotFound as e:
        pytest.skip(str(e))
    from spark_lab import summarize as S
    from spark_lab.llm import LLM
    llm = LLM.load("smollm2-135m-instruct")
    s = S.summarize(S.read_document(ROOT / "README.md"), "hybrid", max_words=150, llm=llm, progress=False)
    assert s.words_out >= 20 and not has_loop(s.text), f"{loop_report(s.text)} words_out={s.words_out} in {s.text!r}"
