"""nanoseek.corpus: the default corpus is deterministic, split cleanly, well formed and correct; user files load."""

import hashlib
import importlib.util
import json
import re
from fractions import Fraction

import pytest

from nanoseek import corpus
from nanoseek.tasks import Problem, Unsolvable, get_task, is_heldout, problem_key
from nanoseek.tasks.arithmetic import work
from nanoseek.template import USER, r1_completion, r1_prompt

N = 60
FRACTION = 0.05
DOC = re.compile(r"^User: (.*)\nAssistant: <think> (.*) </think> <answer> (.*) </answer>", re.S)


@pytest.fixture(scope="module")
def built():
    return corpus.build_default_corpus(seed=0, n_problems=N, heldout_fraction=FRACTION)


@pytest.fixture(scope="module")
def problems():
    return corpus.reasoning_documents(seed=3, n=300)


def _parts(doc):
    """(question, think, answer) of an R1-template document."""
    m = DOC.search(doc)
    assert m is not None and doc.startswith(USER), doc[:400]
    return m.groups()


def _is_problem(doc):
    return doc.startswith(USER)


def test_same_seed_same_corpus_other_seed_other_problems(built):
    again = corpus.build_default_corpus(seed=0, n_problems=N, heldout_fraction=FRACTION)
    assert again == built  # same lists, same order, same text
    other = corpus.build_default_corpus(seed=1, n_problems=N, heldout_fraction=FRACTION)
    mine = {d for d in built["train"] if _is_problem(d)}
    theirs = {d for d in other["train"] if _is_problem(d)}
    assert len(mine) > N * 0.9 and len(theirs) > N * 0.9
    assert len(mine & theirs) < N // 4  # only tiny problems such as "1 + 5" can coincide
    # The natural text is the same; only which documents are held out depends on the seed.
    natural = lambda c: sorted(d for split in c.values() for d in split if not _is_problem(d))  # noqa: E731
    assert natural(other) == natural(built)


def test_split_sizes_and_no_heldout_document_in_train(built):
    natural = corpus.natural_documents()
    held_problems = [d for d in built["heldout"] if _is_problem(d)]
    assert len(held_problems) == round(N * FRACTION)
    assert sum(_is_problem(d) for d in built["train"]) == N
    assert len(built["heldout"]) - len(held_problems) == round(len(natural) * FRACTION)
    assert len(built["train"]) + len(built["heldout"]) == len(natural) + N + round(N * FRACTION)
    assert not set(built["heldout"]) & set(built["train"])
    assert len(set(built["heldout"])) == len(built["heldout"])


def test_no_training_document_holds_a_heldout_question(built):
    train_q = [_parts(d)[0] for d in built["train"] if _is_problem(d)]
    held_q = [_parts(d)[0] for d in built["heldout"] if _is_problem(d)]
    assert train_q and held_q
    assert not any(is_heldout(q) for q in train_q) and all(is_heldout(q) for q in held_q)


@pytest.fixture(scope="module")
def with_easy():
    """The speedrun's mix in miniature: enough one-digit sums to cover almost all of that small space."""
    return corpus.build_default_corpus(seed=0, n_problems=200, heldout_fraction=0.02, easy_problems=1500)


@pytest.mark.parametrize("name, options", [("chain_sum", corpus.EASY[1]), ("chain_sum", {}),
                                           ("basic_arithmetic", {}), ("gsm_symbolic", {})])
def test_evaluation_problems_never_appear_in_the_corpus(with_easy, name, options):
    """Zero overlap by content between what evaluation scores and every training document, checked both by the
    canonical key and verbatim (the question as it appears in the R1 template)."""
    train = [d for d in with_easy["train"] if _is_problem(d)]
    train_keys = {problem_key(_parts(d)[0]) for d in train}
    task = get_task(name, **options)
    held = task.problems(0, 20, split="heldout")
    assert not {problem_key(p.question) for p in held} & train_keys
    text = "\n".join(train)
    assert not any(f"User: {p.question.strip()}\nAssistant:" in text for p in held)
    if options == corpus.EASY[1]:  # the corpus covers nearly all of this training space: overlap was certain
        space = {problem_key(p.question) for p in task.problems(1, 120)}  # of the 125 training keys
        assert len(space & train_keys) > 110


def test_reasoning_documents_are_in_the_r1_template(problems):
    assert len(problems) == 300 and problems == corpus.reasoning_documents(seed=3, n=300)
    for doc in problems:
        question, think, answer = _parts(doc)
        completion = doc.split("\nAssistant: <think>", 1)[1]  # the preamble itself names the tags
        assert completion.count("</think>") == 1 and completion.count("<answer>") == 1
        assert completion.endswith("</answer>") and completion.index("</think>") < completion.index("<answer>")
        assert doc == r1_prompt(question) + r1_completion(think, answer)
        assert think.strip() and answer.strip()
    families = {
        "gsm_symbolic": sum("Give the result as your final answer" in d for d in problems),
        "chain_sum": sum("State the final answer to the following arithmetic problem" in d for d in problems),
        "countdown": sum("using all of these numbers" in d for d in problems),
    }
    assert families["gsm_symbolic"] > 80 and families["chain_sum"] > 50 and families["countdown"] >= 1


def _last_computed(think):
    return int(re.findall(r"= (-?\d+)\b", think)[-1])


def test_arithmetic_answers_match_gold_and_worked_solution(problems):
    checked = {"chain_sum": 0, "basic_arithmetic": 0}
    for doc in problems:
        question, think, answer = _parts(doc)
        chain = re.fullmatch(r"State the final answer to the following arithmetic problem: (.*) =", question)
        basic = re.fullmatch(r"Calculate ([-+*/() \d]+)\.", question)
        if not (chain or basic):
            continue
        expression = (chain or basic).group(1)
        # The generators' gold answer is Python's eval with / read as // (reasoning_gym's eval_floordiv).
        gold = eval(expression.replace("/", "//"))
        assert int(answer) == gold, doc
        assert _last_computed(think) == gold, doc
        assert len(think.splitlines()) >= 3  # intro, at least one step, conclusion
        checked["chain_sum" if chain else "basic_arithmetic"] += 1
    assert checked["chain_sum"] > 50 and checked["basic_arithmetic"] > 50


def test_countdown_and_gsm_answers_check_out(problems):
    for doc in problems:
        question, think, answer = _parts(doc)
        if "using all of these numbers" in question:
            target = int(re.search(r"(?:Calculate|make|equals|reach) (\d+)", question).group(1))
            assert Fraction(eval(answer)) == target and _last_computed(think) == target, doc
        elif "Give the result as your final answer" in question:
            assert re.fullmatch(r"\d+(\.\d+)?", answer), doc  # plain number; negative answers are skipped


@pytest.mark.parametrize("expression, value, steps", [
    ("4 - 1 - 7", -4, 2),
    ("-9 + 5 - -1 * -4 + -2 * 2", -12, 5),  # * before +/-, negative literals
    ("-( ( -6915 / 5 ) - 7652 + 4844 ) - 7314", -3123, 5),  # a negated bracket is its own step
    ("27*(-2 + (5 - 55 + 62)/2)", 108, 5),  # countdown's spacing
    ("( 69 / 3 )", 23, 1),
])
def test_worked_steps(expression, value, steps):
    lines, result = work(expression)
    assert result == value == eval(expression.replace("/", "//"))
    assert len(lines) == steps and _last_computed(lines[-1]) == value


@pytest.mark.parametrize("expression", [
    "40 / -50 + ( 1 - 0 + 50 )", "3 / 2 * 2", "3 / 0",  # the generators' // would round these
    "4 - - - 2", "1.5 + 2", "2 3 + 1", "2 (3)", "(1 + 2", "1 + 2)", ") 1 + 2 (", "1 +",
])
def test_worked_steps_skip_inexact_division_and_garbage(expression):
    with pytest.raises(Unsolvable):
        work(expression)


def test_item_whose_gold_disagrees_is_skipped():
    task = get_task("basic_arithmetic")
    item = Problem(question="Calculate 2 + 3.", answer="6",
                   metadata={"expression": "2 + 3", "source_dataset": "basic_arithmetic"})
    with pytest.raises(Unsolvable):
        task.solve(item)
    item.answer = "5"
    assert task.solve(item)[1] == "5"


def test_natural_documents_are_clean():
    docs = corpus.natural_documents()
    assert docs == corpus.natural_documents()
    assert len(docs) > 12_000 and sum(map(len, docs)) > 8_000_000 and len(set(docs)) == len(docs)
    for doc in docs:
        assert doc and doc == doc.strip()
        assert "  " not in doc and "\n\n\n" not in doc and "\t" not in doc and "\xa0" not in doc
        assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f\u200b\ufeff]", doc)
    bible = corpus._bible()
    assert not any("[" in d or "]" in d for d in bible)
    assert "and darkness was upon the face of the deep" in bible[0]  # "[was]" kept as a word
    assert max(map(len, bible)) <= 2 * corpus.CHUNK_CHARS
    verne = corpus._verne()
    assert "twenty-ninth century live continually in fairyland" in " ".join(verne)
    assert not any("Gutenberg" in d or "*** " in d or "_" in d for d in verne)  # _italics_ marks dropped
    wiki = corpus._wikipedia()
    assert wiki[0].startswith("20th-century classical music\n\n20th-century classical music is")


def test_read_user_data(tmp_path):
    (tmp_path / "a.txt").write_text("First doc\nline two.\n\n\n  Second  doc.\n\n")
    (tmp_path / "b.md").write_text("# Notes\n\nThird\x00 doc.")
    rows = [{"text": "json one"}, {"text": "json two", "id": 2}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert corpus.read_user_data([str(tmp_path / "a.txt")]) == ["First doc\nline two.", "Second  doc."]
    assert corpus.read_user_data([str(tmp_path / "c.jsonl")]) == ["json one", "json two"]
    assert corpus.read_user_data([str(tmp_path / "*.txt"), str(tmp_path / "*.md")]) == [
        "First doc\nline two.", "Second  doc.", "# Notes", "Third doc."]
    assert len(corpus.read_user_data([str(tmp_path)])) == 6  # a directory means the readable files in it


def test_read_user_data_errors(tmp_path):
    missing = str(tmp_path / "nothing*.txt")
    with pytest.raises(ValueError, match=re.escape(missing)):
        corpus.read_user_data([missing])
    (tmp_path / "empty.txt").write_text("\n  \n\n")
    empty = str(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match=re.escape(empty) + ".*no text"):
        corpus.read_user_data([empty])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        corpus.read_user_data([str(tmp_path / "bad.jsonl")])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported"):
        corpus.read_user_data([str(tmp_path / "x.csv")])


def test_parquet_reads_or_says_how_to_fix(tmp_path, monkeypatch):
    """With pyarrow: the text column is read. Without it (simulated): one line saying what to install."""
    if importlib.util.find_spec("pyarrow") is not None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": ["first doc", "second doc"]}), str(tmp_path / "d.parquet"))
        assert corpus.read_user_data([str(tmp_path / "d.parquet")]) == ["first doc", "second doc"]
    monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)  # import pyarrow now fails
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    (tmp_path / "e.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match="pip install pyarrow"):
        corpus.read_user_data([str(tmp_path / "e.parquet")])


# What the code before the one-module-per-family redesign built (sha256 of the JSON, first 16 hex digits): moving
# every worked-solution writer into its family changed no byte of any document, split or mixture.
PINNED = {
    "worked_chain": "e1499cdc5d1bb079", "worked_basic": "a20af9f3e2f78231", "worked_gsm": "c76ea2db9470beea",
    "worked_countdown": "0fdfe96dbb42cb71", "worked_solution": "c10cf610bedc9e02",
    "reasoning_3_300": "df1bb5e5c497ec64", "reasoning_heldout": "72de61f8e5d2578b",
    "built_0_60_005": "c756c469b0a1b878", "with_easy": "96004c700608286b",
}


def _h(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def test_corpus_bytes_match_the_code_before_the_registry(built, problems, with_easy):
    got = {"built_0_60_005": _h(built), "reasoning_3_300": _h(problems), "with_easy": _h(with_easy),
           "reasoning_heldout": _h(corpus._reasoning(5, 100, "heldout", corpus._NoBar())),
           "worked_chain": _h(corpus.worked_solutions("chain_sum", 40, seed=1, min_terms=2, max_terms=4, min_digits=1,
                                                      max_digits=2)),
           "worked_basic": _h(corpus.worked_solutions("basic_arithmetic", 30, seed=2)),
           "worked_gsm": _h(corpus.worked_solutions("gsm_symbolic", 30, seed=2)),
           "worked_countdown": _h(corpus.worked_solutions("countdown", 3, seed=2))}
    questions = [p.question for p in get_task("chain_sum", max_terms=5).generate(7, 50)]
    got["worked_solution"] = _h([corpus.worked_solution(q) for q in questions])
    assert got == PINNED
