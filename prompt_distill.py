"""
Knowledge injection via prompt distillation (Kujanpaa et al., arXiv 2412.14964), in plain PyTorch.

    python prompt_distill.py --doc notes.txt --eval notes.qa.jsonl

1. The model, with a passage of the document in its prompt, writes questions about its sentences and
   answers them; then each name and number of the document, blanked out of its sentence, to fill in
   (and with --top-up-rounds, more questions about the sentences that few of its answers state).
2. A student (the same frozen model plus a LoRA adapter) that does NOT see the passage is trained to
   match the teacher's (adapters off, passage in the prompt) full next-token distributions on the answer
   tokens, with a temperature-scaled KL loss. One model in memory is both: lora_disabled() is the teacher.
3. Afterwards the student answers closed-book about as well as the teacher does with the document (RAG).

`--method sft` trains the baseline instead: cross-entropy on the same answers. A forgetting guard (on by
default) mixes in general prompts on which the student matches the base model, so the adapter learns the
document and nothing else; among them, the document's superlatives asked of the world and, after a
document with years, the prompts the base model answers with a year come up more often.
"""

import argparse
import collections
import contextlib
import ctypes
import functools
import itertools
import json
import math
import os
import random
import re
import shutil
import string
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import lora
import model as m

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


class InputError(Exception):
    """Bad input from the user; the message is one line meant for a person."""


# -----------------------------------------------------------------------------
# Settings: defaults measured for SmolLM2-135M-Instruct on 2 CPU cores. The numbers in the comments come
# from MEASUREMENTS.md, which gives each one's runs and command.


@dataclass
class Settings:
    method: str = "distill"  # or "sft": the baseline
    questions_per_passage: int = 50  # the paper writes 30 per paragraph; a few are dropped as duplicates
    question_temperature: float = 0.7  # 1.0 drifts off the sentence, the paper's 1.5 is gibberish at 135M
    question_top_k: int = 50
    pairs_per_fact: int = 6  # the top-up's aim; 0: keep the model's own pairs even where they state nothing
    top_up_rounds: int = 0  # asking again about sentences few pairs state won 86 vs 75 of 164 before the
    # blanks; with them, 2 rounds score 90 vs 89 of 164 and take 10:03 vs 8:37 of the 10 minutes
    blanks: bool = True  # also ask for each name and number, blanked out: 90 vs 72 of 164
    answer_temperature: float = 0.0  # greedy: sampled at 1.0, both methods lost half their score
    max_answer_tokens: int = 32
    generation_batch: int = 64  # rows decoded together at most: 1.3x the rows/s of 32 here
    passage_tokens: int = 160  # about a paragraph: distilled 30 -> 38 of 82 against the page
    rank: int = 32
    alpha: float = 32.0
    targets: tuple = lora.DEFAULT_TARGETS  # the seven projections; the MLP only, with a fifth epoch for the
    # time it saves, tied: 80 vs 78 of 164, at 0.45-0.84x the drift and 1.04x the training time
    lr: float = 1e-3  # the 135M model's: Qwen2.5-Coder-0.5B drifted 7x further at 1e-3 than at 3e-4 and lost
    # 8 general answers against 3, at the same document score (MEASUREMENTS.md, *A larger model*)
    lr_b_ratio: float = 1.0  # LoRA+ (Hayou et al. 2024): B learns at lr x this. 2 recalls more of the pairs
    # but answers no more gold questions (55 vs 54 of 110) and drifts 1.5-1.7x further
    weight_decay: float = 0.1
    epochs: int = 4  # 5 beat 6 (63 vs 60 of 138); with the blanks 5 beat 4 (50 vs 46 of 82) but took kelvaran
    # past the 10 minutes; 8 drew level with SFT (134 vs 132 of 218, from 121 vs 128) in 10.5-14 minutes
    batch_size: int = 4  # 8 learned no better (12 vs 13 of 28) and peaked 0.6 GB higher; 2 answered 87 vs 78
    # of 164 (SFT at 2: 92) but trained 1.5x as long, past the 10 minutes on two documents, leaked 4 answers
    step_tokens: int = 512  # rows x longest row in one forward pass; a step of longer rows runs in parts,
    # which keeps a document of long questions under 3 GB: SQuAD's new_wiki peaked 3.20 -> 2.14 GiB
    warmup: float = 0.1  # share of the steps
    temperature: float = 1.0  # of the distillation loss
    guard: bool = True
    guard_batch: int = 1  # guard rows mixed into every step
    guard_weight: float = 1.0
    superlative_share: float = 0.25  # of the guard's rows: the document's superlatives asked of the world;
    # no more "Mount Ystrel" as the world's tallest mountain, 84 vs 89 of 164 on the document
    year_share: float = 0.2  # of the guard's rows, for a document that states a year: the general prompts
    # whose base answer states one; no more penicillin "discovered in 1978", leakage 0 vs 3 of 228
    holdout: float = 0.1  # share of generated questions kept out of training (used when no --eval)
    precision: str = "auto"  # "bf16": autocast matmuls to bfloat16; "auto": where the CPU has bf16 units;
    # "fp32": float32 throughout, a GPU's weights too (bfloat16 there otherwise). On a long document fp32
    # peaks lower: six pages 2.63 GiB against autocast's 3.08, for about 1.25x the training time
    seed: int = 0


def flag(name: str) -> str:
    """The command-line flag of a Settings field: guard_batch -> --guard-batch."""
    return "--" + name.replace("_", "-")


def check_settings(s: Settings) -> None:
    """Refuse, before any model loads, a setting that would fail or silently do nothing minutes later."""
    at_least = {"questions_per_passage": 1, "rank": 1, "epochs": 1, "batch_size": 1, "generation_batch": 1,
                "step_tokens": 1, "passage_tokens": 16, "pairs_per_fact": 0, "top_up_rounds": 0}
    for name, low in at_least.items():
        if getattr(s, name) < low:
            raise InputError(f"{flag(name)} must be at least {low}")
    if s.top_up_rounds and not s.pairs_per_fact:
        raise InputError("--top-up-rounds asks again about facts that fewer than --pairs-per-fact pairs state; "
                         "with --pairs-per-fact 0 it would do nothing")
    if s.guard and s.guard_batch < 1:
        raise InputError("--guard-batch must be at least 1 (--no-guard trains without the guard)")
    for name in ("alpha", "lr", "lr_b_ratio", "temperature"):
        if not 0 < getattr(s, name) < math.inf:  # written so that nan is refused too
            raise InputError(f"{flag(name)} must be a number above 0")
    for name in ("guard_weight", "question_temperature"):
        if not 0 <= getattr(s, name) < math.inf:
            raise InputError(f"{flag(name)} must be a number of at least 0")
    shares = (s.superlative_share, s.year_share)
    if not (min(shares) >= 0 and sum(shares) <= 1):
        raise InputError("--superlative-share and --year-share are shares of the guard's rows: "
                         "each at least 0, together at most 1")


# -----------------------------------------------------------------------------
# A person watching: one progress line per stage


class Progress:
    def __init__(self, stage: str, total: int, unit: str = ""):
        self.stage, self.total, self.unit, self.done = stage, total, unit, 0
        self.start = self.last = time.time()
        self.tty = sys.stderr.isatty()

    def update(self, n: int = 1, **info) -> None:
        self.done += n
        now = time.time()
        if now - self.last < (0.5 if self.tty else 10) and self.done < self.total:
            return
        self.last = now
        elapsed = now - self.start
        left = elapsed / self.done * (self.total - self.done) if self.done else 0
        extra = "".join(f"  {k} {v:.4g}" if isinstance(v, float) else f"  {k} {v}" for k, v in info.items())
        line = f"{self.stage:<10} {self.done}/{self.total}{self.unit}{extra}  {elapsed:.0f}s, {left:.0f}s left"
        print(("\r" + line.ljust(100)) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr,
              flush=True)

    def close(self) -> float:
        if self.tty:
            print(file=sys.stderr)
        return time.time() - self.start


@functools.cache  # asked at every training step; /proc/cpuinfo is read once
def cpu_has_bf16_units() -> bool:
    """AVX512-BF16 or AMX: bfloat16 matmuls run faster than float32 ones on this CPU (Linux only)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def uses_autocast(net, settings: Settings) -> bool:
    """Whether a float32 model's training runs under bfloat16 autocast (see precision)."""
    weight = net.model.embed_tokens.weight  # not lm_head's: lm_head may be wrapped in a LoRA layer
    auto = settings.precision == "auto" and weight.device.type == "cpu" and cpu_has_bf16_units()
    return (settings.precision == "bf16" or auto) and weight.dtype == torch.float32


def precision(net, settings: Settings):
    """
    bfloat16 autocast for a float32 model's training steps where it pays: on a 2-core CPU with bf16 units
    a step ran 1.2-1.6x faster, at a per-token KL of about 5e-4 to float32. LoRA and the loss stay float32.
    Generation stays float32 (exact greedy answers): decoding 32 rows was no faster under autocast,
    and one row 2x slower, since every weight is cast again at every step.
    cache_enabled=False: otherwise autocast keeps the bf16 copy of each trainable weight for as long as
    the block lasts, and the forward passes after an optimizer step would still see the old LoRA weights.
    """
    device = net.model.embed_tokens.weight.device.type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=uses_autocast(net, settings), cache_enabled=False)


# oneDNN, which runs a CPU's bfloat16 matmuls, keeps what it builds for each new matrix shape (about a
# megabyte) in two caches of 1,024 entries: its own and PyTorch's ideep layer's. Padding (SHAPE_MULTIPLE)
# keeps the student's shapes few, but the teacher meets every passage's length, so the caches grew with
# the document. Both capped at 64, six pages peaked at 3.08 GiB, not 3.72, and the README run at 2.14, not
# 2.24, in the same time and with the same adapter (at 16 a step rebuilt its own kernels, 1.3x slower).
# MKL's float32 matmuls and GPUs use neither cache.
KERNEL_CACHE_CAPACITY = 64


def limit_kernel_caches() -> None:
    """oneDNN and ideep read these at their first bfloat16 matmul, so main sets them before any work.
    A user's own setting wins."""
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(KERNEL_CACHE_CAPACITY))


@contextlib.contextmanager
def frozen_weights_in_bf16(net, settings: Settings):
    """
    While training under autocast, the frozen weights of the linear layers are bfloat16 tensors. Autocast
    casts a float32 weight at each use and caches the cast only for weights that train, so every forward
    pass cast the base model's weights anew, and kept the casts alive for the backward pass: 6-9% of a
    step's time here, and 0.24 GiB of the README run's peak. They are the numbers autocast would have made,
    so training computes exactly what it did (the README run's adapter is the same file, byte for byte).
    The float32 weights come back afterwards, for generation.
    """
    if not uses_autocast(net, settings):
        yield
        return
    frozen = [mod for mod in net.modules() if isinstance(mod, torch.nn.Linear) and not mod.weight.requires_grad]
    float32 = [mod.weight for mod in frozen]
    for mod in frozen:  # a new Parameter, not new .data: lm_head's weight is the embedding's, which stays
        mod.weight = torch.nn.Parameter(mod.weight.detach().to(torch.bfloat16), requires_grad=False)
    try:
        yield
    finally:
        for mod, weight in zip(frozen, float32):
            mod.weight = weight


def model_dtype(settings: Settings) -> torch.dtype | None:
    """float32 weights for --precision fp32 on any device; else model.py's choice (bfloat16 on a GPU)."""
    return torch.float32 if settings.precision == "fp32" else None


def return_freed_memory() -> None:
    """
    Hand the heap's free memory back to the OS. glibc keeps what training freed, at its high-water mark;
    evaluation, which comes next, needs less. (After every step it cost 20% of the step's time.)
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, Windows, musl): nothing to do
        pass


def peak_memory_gb() -> float:
    """This process's peak resident memory so far (the CPU side only)."""
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)  # bytes on macOS, kilobytes on Linux


# -----------------------------------------------------------------------------
# 1. The document, split into passages that fit the context window


def read_document(path: str) -> str:
    if os.path.isdir(path):
        raise InputError(f"{path} is a folder; --doc takes one text file")
    if not os.path.isfile(path):
        raise InputError(f"document not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    if b"\x00" in raw:
        raise InputError(f"{path} is not a text file (it holds NUL bytes)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text (byte {e.start}); convert it first") from None
    if not text.strip():
        raise InputError(f"{path} is empty")
    return text.replace("\r\n", "\n").strip()


def longest_fit(n: int, fits) -> int:
    """
    The largest k in 1 .. n-1 with fits(k), by bisection, for a fits() that holds at 1 and fails at n. Not
    by proportion: a URL's tokens are denser than the words after it.
    """
    low, high = 1, n - 1
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def split_passages(text: str, count_tokens, max_tokens: int) -> list[str]:
    """Paragraphs packed into passages of at most max_tokens; a longer paragraph is split at sentences."""
    pieces = []
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip()
        if count_tokens(paragraph) <= max_tokens:
            pieces.append(paragraph)
            continue
        for sentence in re.split(r"(?<=[.!?])\s+", paragraph):
            words = sentence.split()
            while count_tokens(" ".join(words)) > max_tokens:  # one giant sentence: cut it by words
                if count_tokens(words[0]) > max_tokens:  # one giant word (a URL, a blob): by characters
                    word = words[0]
                    cut = longest_fit(len(word), lambda k: count_tokens(word[:k]) <= max_tokens)
                    words[:1] = [word[:cut], word[cut:]]
                cut = longest_fit(len(words), lambda k: count_tokens(" ".join(words[:k])) <= max_tokens)
                pieces.append(" ".join(words[:cut]))
                words = words[cut:]
            pieces.append(" ".join(words))
    passages, current = [], ""
    for piece in filter(None, pieces):
        joined = f"{current}\n\n{piece}" if current else piece
        if current and count_tokens(joined) > max_tokens:
            passages.append(current)
            joined = piece
        current = joined
    return passages + [current]


# Open book shows the model the whole document when it fits in this many tokens, as a person would paste
# it into a chat; a longer one is split and each question gets its best-matching part.
OPEN_BOOK_TOKENS = 1024


def document_passages(document: str, prompts: "Prompts", net, max_tokens: int) -> list[str]:
    """The document's passages for this model: short enough to leave room for a question and answer."""
    context = net.config.max_position_embeddings
    budget = min(max_tokens, context - min(512, context // 2))
    return split_passages(document, lambda s: len(prompts.encode(s)), budget)


# -----------------------------------------------------------------------------
# 2. The prompts. The teacher sees [passage][instruction + question]; the passage part is shared by
# every question about it, so it is computed once (a KV-cache prefix) instead of once per question.

QUESTION_INSTRUCTION = ('Turn this sentence from the text above into a question that asks for one of its details: '
                        '"{fact}"\nWrite only the question.')
ANSWER_INSTRUCTION = "Answer the question using the text above, in a few words.\nQuestion: {q}"
MAX_QUESTION_TOKENS = 32  # a longer one rambles and is dropped by the parser anyway


class Prompts:
    def __init__(self, tokenizer, chat: m.Chat):
        self.tokenizer, self.chat = tokenizer, chat

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def with_passage(self, passage: str, request: str) -> tuple[list[int], list[int]]:
        """(prefix, suffix) ids: the chat-formatted passage, then the request. prefix + suffix is the prompt."""
        text = self.chat.render([{"role": "user", "content": f"{passage}\n\n{request}"}])
        cut = text.index(passage) + len(passage)  # split at the passage's end: a token boundary
        return self.encode(text[:cut]), self.encode(text[cut:])

    def open_book(self, passage: str, question: str) -> tuple[list[int], list[int]]:
        """The teacher's (prefix, suffix) for `question` with `passage` in its prompt."""
        return self.with_passage(passage, ANSWER_INSTRUCTION.format(q=question))

    def closed_book(self, question: str) -> list[int]:
        return self.encode(self.chat.render([{"role": "user", "content": question}]))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


GENERATION_KV_BYTES = 1.5 * 2**30  # a batch's KV cache at most: 32 rows of a 1,024-token page for SmolLM2-135M


def generate_batched(net, prompts: list[list[int]], max_new: int, stop_ids, batch_size: int, progress=None,
                     prefix=(), **sampling) -> list[list[int]]:
    """
    m.generate over batches of at most batch_size rows, all of about the same size: a decode step costs
    nearly as much for 13 rows as for 32, so 77 rows at 32 go as 25 + 26 + 26, not 32 + 32 + 13. Every row
    holds a copy of the prefix in its KV cache, so a long prefix makes the batches smaller.
    """
    if not prompts:  # a passage that kept no questions
        return []
    bytes_per_token = m.KVCache.bytes_per_token(net.config, net.model.embed_tokens.weight.dtype)
    row_tokens = len(prefix) + max(map(len, prompts)) + max_new
    batch_size = max(1, min(batch_size, int(GENERATION_KV_BYTES // (bytes_per_token * row_tokens))))
    batches = math.ceil(len(prompts) / batch_size)
    bounds = [len(prompts) * i // batches for i in range(batches + 1)]
    out = []
    for start, end in zip(bounds, bounds[1:]):
        out += m.generate(net, prompts[start:end], max_new, stop_ids, prefix=prefix, **sampling)
        if progress:
            progress.update(end - start)
    return out


# -----------------------------------------------------------------------------
# 3. Questions, written by the model about each passage


def parse_questions(text: str) -> list[str]:
    """One question per line; numbering, bullets and labels stripped; lines that are not questions dropped."""
    questions = []
    for line in text.splitlines():
        line = re.sub(r"^\s*(?:\d+[.)]|[-*\u2022]|Q\d*[:.])\s*", "", line).strip()
        line = re.sub(r"^[^?]*?(?:question|write)[^?:]*:\s*", "", line, flags=re.I).strip(' "')  # "Question: ..."
        if line.endswith("?") and 3 <= len(line.split()) <= 40 and not re.search(
                r"\b(text|passage|document|article|paragraph|sentence|fact|facts|question)\b", line, re.I):
            questions.append(line)
    return questions


ARTICLES = ("a", "an", "the")  # dropped before any comparison of words, as SQuAD's evaluation drops them


def normalize(text: str) -> str:
    """Lowercase, no punctuation or articles, single spaces (as SQuAD's evaluation does)."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(w for w in text.split() if w not in ARTICLES)


def word_set(text: str) -> set[str]:
    """The normalized words of text: what near-duplicates, fact words and passage matches compare."""
    return set(normalize(text).split())


def near_duplicate(a: set, b: set) -> bool:
    return len(a & b) / max(1, len(a | b)) > 0.7


def facts(passage: str) -> list[str]:
    """The passage's sentences (or lines, for notes), the facts that questions are asked about."""
    pieces = re.split(r"(?<=[.!?])(?<!\bDr\.)(?<!\bMr\.)(?<!\bMs\.)(?<!\bMrs\.)(?<!\bSt\.)\s+|\n+", passage)
    return [p.strip() for p in pieces if len(p.split()) >= 4]


def generate_questions(net, prompts: Prompts, passages, settings: Settings, generator) -> list[tuple[int, str, str]]:
    """
    (passage index, question, sentence it asks about) triples, about questions_per_passage per passage,
    deduplicated. Each call shows the model the whole passage and points it at one sentence: a small model
    asked for questions about a whole text writes a few vague ones again and again; pointed at each fact in
    turn, it covers them all.
    """
    jobs = []  # (passage index, fact), each fact asked about several times at a high temperature
    for index, passage in enumerate(passages):
        sentences = facts(passage) or [passage]
        per_fact = math.ceil(1.5 * settings.questions_per_passage / len(sentences))  # some are dropped
        jobs += [(index, fact) for fact in sentences for _ in range(per_fact)]
    progress = Progress("questions", len(jobs), " calls")
    written = write_questions(net, prompts, passages, jobs, settings, generator, progress, seen={})
    progress.close()
    questions = []
    for index in range(len(passages)):
        found = [(q, fact) for i, q, fact in written if i == index]
        random.Random(settings.seed).shuffle(found)
        questions += [(index, q, fact) for q, fact in found[: settings.questions_per_passage]]
    return questions


def write_questions(net, prompts: Prompts, passages, jobs, settings: Settings, generator, progress,
                    seen: dict) -> list[tuple[int, str, str]]:
    """
    One call per job (passage index, sentence); each call gives at most one question. seen holds the
    words of the questions already kept, by passage index, and grows: a near-duplicate is dropped.
    """
    written = []
    for index, passage in enumerate(passages):
        asked_about = [fact for i, fact in jobs if i == index]
        if not asked_about:
            continue
        prefix, _ = prompts.with_passage(passage, "")
        suffixes = [prompts.with_passage(passage, QUESTION_INSTRUCTION.format(fact=fact))[1] for fact in asked_about]
        outputs = generate_batched(net, suffixes, MAX_QUESTION_TOKENS, prompts.chat.stop_ids,
                                   settings.generation_batch, progress, prefix,
                                   temperature=settings.question_temperature, top_k=settings.question_top_k,
                                   generator=generator)
        kept = seen.setdefault(index, [])
        names = distinctive_terms(passage)  # a question that names none of them needs the passage to make sense
        for fact, output in zip(asked_about, outputs):
            for q in parse_questions(prompts.decode(output))[:1]:
                words = word_set(q)
                if names and not mentions(q, names):
                    continue
                if not any(near_duplicate(words, s) for s in kept):
                    kept.append(words)
                    written.append((index, q, fact))
    return written


# -----------------------------------------------------------------------------
# 4. Answers, by the teacher: the passage in its prompt


def answer_open_book(net, prompts: Prompts, passages, questions, settings: Settings, generator, stage="answers"):
    """The teacher's answer ids (ending with the end-of-turn token when it finished) for each
    (passage index, question) of questions."""
    progress = Progress(stage, len(questions), " questions")
    answers = [None] * len(questions)
    for index, passage in enumerate(passages):
        rows = [i for i, (p, _) in enumerate(questions) if p == index]
        prefix, _ = prompts.with_passage(passage, "")
        suffixes = [prompts.open_book(passage, questions[i][1])[1] for i in rows]
        outs = generate_batched(net, suffixes, settings.max_answer_tokens, prompts.chat.stop_ids,
                                settings.generation_batch, progress, prefix,
                                temperature=settings.answer_temperature, generator=generator)
        for i, out in zip(rows, outs):
            answers[i] = out
    progress.close()
    return answers


# -----------------------------------------------------------------------------
# 4b. More questions where few pairs state a fact. The student learns what the pairs state: of the gold
# questions whose answer no training pair stated it got 0 of 23 right; of those six or more stated, 38
# of 50 (MEASUREMENTS.md). The small model keeps asking about some sentences and skips others, so we
# count, for each sentence, the pairs that state one of its facts, and ask again about those short of
# pairs_per_fact.
# Off by default (--top-up-rounds 2 turns it on): the blanks (4c) now reach every name and number.


def fact_words(document: str) -> set[str]:
    """
    The words that name one fact of the document: its names and numbers, and the words found in only one
    of its sentences ("ferryman", "nine"; not "town", which many sentences use).
    """
    counts = collections.Counter(w for sentence in facts(document)
                                 for w in word_set(sentence) - STOPWORDS)
    return {w for w, n in counts.items() if n == 1} | {normalize(t) for t in distinctive_terms(document)}


def stated(question: str, answer: str, words: set[str]) -> set[str]:
    """
    The fact words an answer names and its question does not: what the pair teaches. "Is Odessa Marchbank
    the mayor?" answered "Odessa Marchbank is the mayor." teaches nothing; about a fifth of the pairs are
    like that, and they are dropped.
    """
    return (word_set(answer) - word_set(question)) & words


def top_up(net, prompts: Prompts, passages, qa: list, words: set[str], settings: Settings, generator) -> list:
    """
    qa, the (passage index, question, sentence, answer ids) pairs, with more pairs about the sentences
    that fewer than pairs_per_fact pairs state: two calls per missing pair, since fewer than half the
    calls give a new pair that states something; at most 12 per sentence, in top_up_rounds rounds.
    """
    for number in range(1, settings.top_up_rounds + 1):
        jobs = []
        for index, passage in enumerate(passages):
            pairs = [(q, prompts.decode(a)) for p, q, _, a in qa if p == index]
            for sentence in facts(passage) or [passage]:
                its_words = words & word_set(sentence)
                have = sum(bool(stated(q, a, its_words)) for q, a in pairs)
                if its_words and have < settings.pairs_per_fact:
                    jobs += [(index, sentence)] * min(12, 2 * (settings.pairs_per_fact - have))
        if not jobs:
            break
        seen = {}
        for p, q, _, _ in qa:
            seen.setdefault(p, []).append(word_set(q))
        progress = Progress(f"top-up {number}", len(jobs), " calls")
        written = write_questions(net, prompts, passages, jobs, settings, generator, progress, seen)
        progress.close()
        answers = answer_open_book(net, prompts, passages, [(p, q) for p, q, _ in written], settings, generator,
                                   stage=f"answers {number}")
        qa = qa + [(p, q, f, a) for (p, q, f), a in zip(written, answers) if prompts.decode(a)]
    return qa


# -----------------------------------------------------------------------------
# 4c. Blanks: each name and number of each sentence, asked for as a blank to fill and as a sentence to
# complete. The model's own questions skip some facts however often it is asked (MEASUREMENTS.md);
# these cover every name and number (of two digits or more) of the document, and the teacher answers
# them from the passage like any question.

CAPITALISED_RUN = r"[A-Z][\w'\-]*(?: (?:of |the )?[A-Z][\w'\-]*)*"  # "the Museum of Lake Crafts"
NAME_OR_NUMBER = re.compile(CAPITALISED_RUN + r"|\b\d[\d,.]*\d\b")


def blanked_questions(passages: list[str], document: str) -> list[tuple[int, str, str]]:
    """
    (passage index, question, sentence) for each run of capitalised words that holds one of the
    document's names ("the Greywillow Lighthouse"), and each of its numbers of two digits or more (a
    single digit, as in "3 March", is left, as distinctive_terms leaves it). A name found in more than
    four sentences is what the document is about ("Quillmere"), not a fact, and is left in place.
    """
    terms = distinctive_terms(document)
    sentences = facts(document)
    spread = {t: sum(t in s for s in sentences) for t in terms}
    questions = []
    for index, passage in enumerate(passages):
        for sentence in facts(passage):
            for match in NAME_OR_NUMBER.finditer(sentence):
                span = match.group(0).rstrip(".,")
                names = [w.removesuffix("'s") for w in span.split() if w.removesuffix("'s") in terms]
                if not names or min(spread[w] for w in names) > 4:
                    continue
                # A sentence's one-word opening ("Because", "Quillmere") is left; a number ("1887 saw") is not.
                if match.start() == 0 and " " not in span and not span[0].isdigit():
                    continue
                before, after = sentence[:match.start()], sentence[match.start() + len(span):]
                questions.append((index, f'Fill in the blank: "{before}___{after}"', sentence))
                if len(before.split()) >= 3:
                    questions.append((index, f'Complete the sentence: "{before.rstrip()} ..."', sentence))
    return questions


# -----------------------------------------------------------------------------
# 5. The loss


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float):
    """
    KL(teacher || student) between the temperature-softened distributions, averaged over tokens and
    multiplied by T^2 (Hinton et al. 2015), so the gradient's size does not shrink as T grows:
    d loss / d student_logits = T * (softmax(student / T) - softmax(teacher / T)) / tokens.
    Logits are (tokens, vocab); computed in float32.
    """
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2


# On a CPU, bf16 matmuls run in oneDNN, which builds a kernel for each new shape (limit_kernel_caches):
# with every batch a new shape, RSS grew by 17 MB a step. There, training pads every matrix to a multiple
# of this many rows, so few kernels are built and, under the caches' cap, few rebuilt. float32 matmuls
# (MKL) build nothing, and the padding would only cost time: 8% of a step here.
SHAPE_MULTIPLE = 16


def shape_multiple(net) -> int:
    weight = net.model.embed_tokens.weight
    bf16 = torch.is_autocast_enabled("cpu") or weight.dtype != torch.float32
    return SHAPE_MULTIPLE if weight.device.type == "cpu" and bf16 else 1


def pack(prompts: list[list[int]], answers: list[list[int]], prefix_len: int = 0, multiple: int = 1):
    """
    Right-padded rows of prompt + answer: ids (B, T), attention mask (B, prefix_len + T), and `select`
    (B, T), true at the positions whose next token is an answer token (position t predicts token t + 1).
    T is rounded up to a multiple of `multiple`.
    """
    B, T = len(prompts), max(len(p) + len(a) for p, a in zip(prompts, answers))
    T = -(-T // multiple) * multiple
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, prefix_len + T, dtype=torch.long)
    mask[:, :prefix_len] = 1
    select = torch.zeros(B, T, dtype=torch.bool)
    for row, (p, a) in enumerate(zip(prompts, answers)):
        ids[row, : len(p) + len(a)] = torch.tensor(p + a)
        mask[row, prefix_len: prefix_len + len(p) + len(a)] = 1
        select[row, len(p) - 1: len(p) + len(a) - 1] = True
    return ids, mask, select


def answer_hidden(net, prompts: list[list[int]], answers: list[list[int]], prefix: m.KVCache | None = None):
    """
    The final hidden states that predict each answer token from its prompt (and the answer tokens before
    it): (total answer tokens, hidden size), rows in order of example, then token. With `prefix` (a
    one-row cache, from m.prefill), every prompt is preceded by the tokens it holds.
    """
    device = net.model.embed_tokens.weight.device
    P = prefix.length if prefix is not None else 0
    ids, mask, select = (t.to(device) for t in pack(prompts, answers, P, shape_multiple(net)))
    cache = prefix.expand(len(prompts), P + ids.shape[1]) if prefix is not None else None
    return net(ids, mask, cache, return_hidden=True)[select]  # only answer positions meet the large lm_head


def logits_of(net, hidden: torch.Tensor) -> torch.Tensor:
    n = hidden.shape[0]
    return net.lm_head(F.pad(hidden, (0, 0, 0, -n % shape_multiple(net))))[:n]


def answer_logits(net, prompts: list[list[int]], answers: list[list[int]], prefix: m.KVCache | None = None):
    """(total answer tokens, vocab): the logits of answer_hidden."""
    return logits_of(net, answer_hidden(net, prompts, answers, prefix))


# -----------------------------------------------------------------------------
# 6. Training


@dataclass
class Example:
    prefix: list[int]  # the teacher's shared prefix (the passage); empty for a guard example
    teacher: list[int]  # the rest of the teacher's prompt
    student: list[int]  # the student's prompt: the question alone
    answer: list[int]  # the teacher's answer, the tokens both are scored on
    target: torch.Tensor | None = None  # the teacher's final hidden states on the answer, from compute_targets


TARGET_BATCH = 16


@torch.no_grad()
def compute_targets(net, examples: list[Example], settings: Settings) -> None:
    """
    Sets each example's target: the final hidden states of the model with its adapters off, given the
    teacher's prompt (for a guard example: the student's own prompt, so the base model is the teacher),
    at the answer positions. The teacher does not change during training, so this runs once, not in
    every epoch: a step then needs only lm_head to turn the targets into the full-vocabulary logits
    (1.06 s a step instead of 1.33 here). Hidden states are kept, not logits: 576 numbers a token, not 49,152.
    """
    progress = Progress("targets", len(examples), " examples")
    groups = {}
    for e in examples:
        groups.setdefault(tuple(e.prefix), []).append(e)
    with lora.lora_disabled(net), precision(net, settings):
        for prefix, group in groups.items():
            cache = m.prefill(net, list(prefix)) if prefix else None  # the passage, computed once
            group = sorted(group, key=lambda e: len(e.teacher) + len(e.answer))  # rows of like length pad less
            for i in range(0, len(group), TARGET_BATCH):
                chunk = group[i:i + TARGET_BATCH]
                hidden = answer_hidden(net, [e.teacher for e in chunk], [e.answer for e in chunk], cache)
                for e, h in zip(chunk, hidden.split([len(e.answer) for e in chunk])):
                    e.target = h.clone()  # a view would keep the whole chunk's tensor alive
                progress.update(len(chunk))
    progress.close()


@torch.no_grad()
def target_logits(net, examples: list[Example]) -> torch.Tensor:
    with lora.lora_disabled(net):  # lm_head may carry an adapter too
        return logits_of(net, torch.cat([e.target for e in examples]))


def make_batches(examples: list[Example], batch_size: int, rng: random.Random) -> list[list[Example]]:
    """Batches in random order, each of examples of about the same length: on a CPU padding costs time."""
    examples = examples[:]
    rng.shuffle(examples)  # ties in length are broken at random, so batches differ between epochs
    examples.sort(key=lambda e: len(e.student) + len(e.answer))
    batches = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
    rng.shuffle(batches)
    return batches


def common_start(prompts: list[list[int]]) -> list[int]:
    """The tokens all prompts start with, leaving every prompt at least one token of its own."""
    n = min(len(p) for p in prompts) - 1
    for i in range(n):
        if any(p[i] != prompts[0][i] for p in prompts):
            return prompts[0][:i]
    return prompts[0][:n]


def batch_loss(net, batch: list[Example], guard: list[Example], settings: Settings):
    """
    (document loss, guard loss) of one step. The student sees the document's questions and the guard's
    general prompts in ONE forward pass: a pass of its own made a step 1.45x slower, this one 1.3x.
    The targets come from the model with its adapters off (compute_targets): the teacher for the
    document, the base model itself for the guard, so a fresh adapter has zero guard loss and the guard
    pulls back whatever the document does not touch.
    """
    rows = batch + guard
    # Every student prompt starts with the chat template's system prompt (24 of a question's 39 tokens
    # with SmolLM2's): it runs once a step, as a prefix with gradients, instead of once a row.
    shared = common_start([e.student for e in rows])
    prefix = m.prefill(net, shared) if shared else None
    student = answer_logits(net, [e.student[len(shared):] for e in rows], [e.answer for e in rows], prefix)
    document_tokens = sum(len(e.answer) for e in batch)
    student, student_on_guard = student[:document_tokens], student[document_tokens:]
    zero = torch.zeros((), device=student.device)  # for a part of a step (step_parts) without such rows
    if not batch:
        loss = zero
    elif settings.method == "sft":
        targets = torch.tensor([t for e in batch for t in e.answer], device=student.device)
        loss = F.cross_entropy(student.float(), targets)
    else:
        loss = distillation_loss(student, target_logits(net, batch), settings.temperature)
    if not guard:
        return loss, zero
    return loss, distillation_loss(student_on_guard, target_logits(net, guard), settings.temperature)


def answer_share(rows: list[Example], of: list[Example]) -> float:
    """The share of `of`'s answer tokens that `rows` hold: a part's weight in its step's mean loss."""
    total = sum(len(e.answer) for e in of)
    return sum(len(e.answer) for e in rows) / total if total else 0.0


def step_parts(batch: list[Example], guard: list[Example], max_tokens: int):
    """
    A step's rows as (document rows, guard rows) parts, each a forward pass of at most `max_tokens`
    (rows x longest row; one row at least). Activations for the backward pass take about 1.4 MB a token
    with the 135M model, so a step of five 180-token rows would hold 1.3 GB of them; in parts, whose
    gradients add up to the step's, it holds half. A step of short rows is one part, as before.
    """
    length = lambda e: len(e.student) + len(e.answer)
    if (len(batch) + len(guard)) * max(map(length, batch + guard)) <= max_tokens:
        return [(batch, guard)]
    rows = sorted([(e, False) for e in batch] + [(e, True) for e in guard], key=lambda r: -length(r[0]))
    parts = [[]]
    for row in rows:
        if parts[-1] and (len(parts[-1]) + 1) * length(parts[-1][0][0]) > max_tokens:
            parts.append([])
        parts[-1].append(row)
    return [([e for e, is_guard in p if not is_guard], [e for e, is_guard in p if is_guard]) for p in parts]


def backward_step(net, batch: list[Example], guard: list[Example], settings: Settings) -> tuple[float, float]:
    """
    Adds one step's gradients to the adapter's, a part (step_parts) at a time; returns the step's
    document loss and its total loss (with the guard's). Each part's mean losses are weighted by the
    part's share of the answer tokens, so the parts' gradients add up to those of the whole step.
    """
    loss_sum = total_sum = 0.0
    for rows, guard_rows in step_parts(batch, guard, settings.step_tokens):
        with precision(net, settings):  # the forward pass; backward runs outside, as autocast wants
            loss, on_guard = batch_loss(net, rows, guard_rows, settings)
            loss = loss * answer_share(rows, batch)
            total = loss + settings.guard_weight * on_guard * answer_share(guard_rows, guard)
        total.backward()
        loss_sum, total_sum = loss_sum + loss.item(), total_sum + total.item()
    return loss_sum, total_sum


def draw_guard(general: list[Example], superlatives: list[Example], years: list[Example], settings: Settings,
               rng: random.Random) -> list[Example]:
    """A step's guard rows: one of the document's superlatives with probability --superlative-share, one of
    the general prompts whose base answer states a year with probability --year-share, else any general
    prompt. Pools, not one list, because a document has a handful of superlatives and the guard over a
    hundred general prompts (139 from data/); an empty pool's share goes to the general prompts."""
    if not general:
        return []
    rows = []
    for _ in range(settings.guard_batch):
        r = rng.random()
        if r < settings.superlative_share:
            pool = superlatives or general
        elif r < settings.superlative_share + settings.year_share:
            pool = years or general
        else:
            pool = general
        rows.append(rng.choice(pool))
    return rows


def train(net, examples: list[Example], general: list[Example], superlatives: list[Example],
          years: list[Example], settings: Settings) -> list[float]:
    """The adapter's training. general, superlatives and years are the guard's pools (empty without the
    guard); years are rows of general, so their targets are general's."""
    compute_targets(net, (examples if settings.method == "distill" else []) + general + superlatives, settings)
    rng = random.Random(settings.seed)
    epochs = [make_batches(examples, settings.batch_size, rng) for _ in range(settings.epochs)]
    steps = sum(len(e) for e in epochs)
    optimizer = torch.optim.AdamW([{"params": lora.lora_parameters(net, "A"), "lr": settings.lr},
                                   {"params": lora.lora_parameters(net, "B"), "lr": settings.lr * settings.lr_b_ratio}],
                                  weight_decay=settings.weight_decay)
    warmup = max(1, int(settings.warmup * steps))

    def lr_factor(step):  # linear warm-up, then cosine decay to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    progress = Progress("training", steps, " steps")
    losses, step = [], 0
    net.train()
    for batches in epochs:
        for batch in batches:
            guard_rows = draw_guard(general, superlatives, years, settings, rng)
            loss, total = backward_step(net, batch, guard_rows, settings)
            norm = torch.nn.utils.clip_grad_norm_(lora.lora_parameters(net), 1.0).item()
            for what, value in (("loss", total), ("gradient norm", norm)):  # a finite loss can overflow backward
                if not math.isfinite(value):
                    raise InputError(f"{what} became {value} at step {step + 1}; try a lower --lr "
                                     "(no adapter was written)")
            lr = schedule.get_last_lr()[0]  # this step's, before the schedule moves on
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
            step += 1
            progress.update(loss=sum(losses[-10:]) / len(losses[-10:]), lr=lr)
    progress.close()
    net.eval()
    return_freed_memory()
    return losses


# -----------------------------------------------------------------------------
# 7. Evaluation: closed book (base), open book (base, passage in the prompt), and the adapter


def read_eval_file(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise InputError(f"eval file not found: {path}")
    items = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                line = line.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{path}, line {number}: not UTF-8 text") from None
            try:
                item = json.loads(line)
            except ValueError:
                item = None
            if not (isinstance(item, dict) and isinstance(item.get("question"), str) and item["question"].strip()
                    and isinstance(item.get("answers"), list) and item["answers"]
                    and all(isinstance(a, str) and a.strip() for a in item["answers"])):
                raise InputError(f'{path}, line {number}: expected {{"question": "...", "answers": ["...", ...]}}')
            items.append({"question": item["question"], "answers": item["answers"]})
    if not items:
        raise InputError(f"{path} holds no questions")
    return items


def answer_words(text: str) -> list[str]:
    """
    The words an answer is scored on: lowercase, no articles, a number's thousands commas dropped (9,000
    is 9000), a decimal or a clock time one word (1.5 holds no 5, 12.5 no 12, 10:45 no 45; 100.0 is 100)
    and every other mark a break between words, so "24-hour" holds 24.
    """
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.lower())
    text = re.sub(r"(?<=\d)\.0+\b", "", text)
    return [w for w in re.findall(r"\d+(?:[.:]\d+)*|\w+", text) if w not in ARTICLES]


def is_correct(answer: str, golds: list[str]) -> bool:
    """
    The answer holds one of the gold strings' words, in order, as whole words. A plain substring would
    count "There are 120 months in a year" as 12 and "2400 minutes in a day" as 24.
    """
    answer = f" {' '.join(answer_words(answer))} "  # the spaces make a match start and end at a word
    return any(gold and f" {' '.join(gold)} " in answer for gold in map(answer_words, golds))


def accuracy(answers: list[str], golds: list[list[str]]) -> float:
    return sum(map(is_correct, answers, golds)) / len(golds)


def pairs_stating(golds: list[list[str]], pairs: list[tuple[str, str]]) -> list[int]:
    """
    For each gold question, how many training (question, answer) pairs state its answer: the teacher's
    answer holds it and the question does not. Over 164 gold questions the student got right 0 of 23 that
    no pair stated, and 38 of 50 that 6 or more did, where open book got 41 (MEASUREMENTS.md, *Why the
    student falls short*): it learns a fact from the answers that state it.
    """
    return [sum(is_correct(a, g) and not is_correct(q, g) for q, a in pairs) for g in golds]


def coverage_table(stating: list[int], golds, opened: list[str], adapted: list[str], name: str):
    """print_table rows: the gold questions binned by pairs_stating, and how many each condition got right."""
    rows = [("pairs stating the answer", "questions", "open book", name)]
    for low, high, label in ((0, 0, "0"), (1, 2, "1-2"), (3, 5, "3-5"), (6, math.inf, "6 or more")):
        picked = [i for i, n in enumerate(stating) if low <= n <= high]
        rows.append((label, len(picked), sum(is_correct(opened[i], golds[i]) for i in picked),
                     sum(is_correct(adapted[i], golds[i]) for i in picked)))
    return rows


def token_f1(answer: str, gold: str) -> float:
    a, g = answer_words(answer), answer_words(gold)
    common = sum(min(a.count(w), g.count(w)) for w in set(a) & set(g))
    return 0.0 if common == 0 else 2 * common / (len(a) + len(g))


def best_passage(passages: list[str], question: str) -> int:
    """For open book with a long document: the passage that shares the most words with the question."""
    words = word_set(question) - STOPWORDS
    return max(range(len(passages)), key=lambda i: len(words & word_set(passages[i])))


def closed_book_answers(net, prompts: Prompts, questions: list[str], settings: Settings, stage: str):
    """The greedy answers' token ids, each question alone in the prompt."""
    progress = Progress(stage, len(questions), " questions")
    outs = generate_batched(net, [prompts.closed_book(q) for q in questions], settings.max_answer_tokens,
                            prompts.chat.stop_ids, settings.generation_batch, progress)
    progress.close()
    return outs


def ask_closed_book(net, prompts: Prompts, questions: list[str], settings: Settings, stage: str) -> list[str]:
    return [prompts.decode(o) for o in closed_book_answers(net, prompts, questions, settings, stage)]


def ask_open_book(net, prompts: Prompts, passages, questions: list[str], settings: Settings) -> list[str]:
    asked = [(best_passage(passages, q), q) for q in questions]  # as RAG would
    greedy = Settings(**{**asdict(settings), "answer_temperature": 0.0})
    outs = answer_open_book(net, prompts, passages, asked, greedy, None, stage="open book")
    return [prompts.decode(o) for o in outs]


# -----------------------------------------------------------------------------
# 8. Forgetting: does the adapter change the model away from the document?

PHRASE_ENDS = set("about above after against before during into over under through near since until ever".split())
STOPWORDS = set("the a an and or of in on at to for by with from as is was were be been are it its this that "
                "these those he she they his her their there here when where what which who whom how why "
                "not no yes but if then than so also each every all any some one".split())


def distinctive_terms(document: str) -> set[str]:
    """Names and numbers of the document: capitalised words never written in lower case there, and numbers."""
    words = re.findall(r"[A-Za-z][A-Za-z'\-]+", document)
    lower = {w for w in words if w[0].islower()}
    names = {w for w in words if w[0].isupper() and w.lower() not in lower and w.lower() not in STOPWORDS
             and len(w) > 2}
    numbers = set(re.findall(r"\b\d[\d,.]*\d\b|\b\d\b", document)) - {str(i) for i in range(10)}
    return names | numbers


def leak_terms(document: str, count_tokens) -> set[str]:
    """
    The names and numbers that give the document away in an unrelated answer: distinctive_terms, less
    the names that the model's tokenizer keeps whole, plus the document's names of several words. A
    name kept whole is a common word ("Blue", "Museum", "However" at a sentence's start), but "Blue
    Hour" is the document's; an invented or rare name comes in pieces (" Quillmere").
    """
    terms = {t.removesuffix("'s") for t in distinctive_terms(document)}  # "Quell's" is Quell
    phrases = set()
    for run in re.findall(CAPITALISED_RUN, document):  # "The Blue Hour Society"
        for is_name, words in itertools.groupby(run.split(), key=lambda w: w in terms):
            words = list(words)
            if is_name and len(words) > 1:
                phrases.add(" ".join(words))
    return phrases | {t for t in terms if t[0].isdigit() or ("'" not in t and count_tokens(" " + t) > 1)}


def mentions(text: str, terms: set[str]) -> set[str]:
    """The terms that appear in text as whole words; a number inside a longer one ("25" in "365.25") does not."""
    return {t for t in terms if re.search(rf"(?<![\w.,]){re.escape(t)}(?![\w]|[.,]\d)", text)}


def leaks(answer: str, question: str, terms: set[str], base_answer: str = "") -> list[str]:
    """
    The document's names and numbers in an answer, leaving out those that the question itself names, in
    any case (a document's "Minnow River" makes "River" a name, but "the longest river?" asks for one),
    and those in the base model's answer, which never saw the document ("the blue whale, 30 meters").
    """
    said = mentions(base_answer, terms)
    return sorted(t for t in mentions(answer, terms) - said if t.lower() not in question.lower())


@torch.no_grad()
def drift(net, prompts_and_answers: list[tuple[list[int], list[int]]]) -> float:
    """Mean KL(base || adapted) of the next-token distributions along the base model's own answers."""
    kls = []
    for i in range(0, len(prompts_and_answers), 8):
        chunk = prompts_and_answers[i:i + 8]
        adapted = answer_logits(net, [p for p, _ in chunk], [a for _, a in chunk])
        with lora.lora_disabled(net):
            base = answer_logits(net, [p for p, _ in chunk], [a for _, a in chunk])
        kls.append(distillation_loss(adapted, base, 1.0).item() * len(adapted))
    return sum(kls) / sum(len(a) for _, a in prompts_and_answers)


# -----------------------------------------------------------------------------
# Outputs, written atomically: everything goes to a temporary folder renamed into place at the end


def epoch_loss(losses: list[float], settings: Settings, epoch: int) -> float:
    per_epoch = len(losses) // settings.epochs
    chunk = losses[epoch * per_epoch:][:per_epoch] if epoch >= 0 else losses[-per_epoch:]
    return sum(chunk) / len(chunk)


def write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def finish_output(tmp: str, out: str) -> None:
    """Put the finished run in place. An old one (--force) is moved aside first and deleted only once the
    new one is at `out`, so an interrupt leaves one of the two whole there."""
    old = f"{out}.old-{os.getpid()}" if os.path.exists(out) else None
    if old:
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old and not os.path.exists(out):
            os.replace(old, out)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for k, row in enumerate(rows):
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def load_general(settings: Settings):
    """General-knowledge questions (retention, leakage) and general prompts (guard training, drift)."""
    general_qa = read_eval_file(os.path.join(DATA, "general_qa.jsonl"))
    with open(os.path.join(DATA, "general_prompts.txt"), encoding="utf-8") as f:
        general = [line.strip() for line in f if line.strip()]
    random.Random(settings.seed).shuffle(general)
    held_out = max(8, len(general) // 5)  # drift is measured on prompts the guard never trained on
    return general_qa, general[held_out:], general[:held_out]


# "The tallest mountain in the world?" answered with the document's "Mount Ystrel, the highest mountain on
# the plateau": what the document calls the highest, the deepest, the first, the adapter takes for the
# world's. So the guard also asks the base model for each of them in the real world, in a share of its steps.
# The phrase sits in a lookahead, so that a word that only looks like one ("the harvest festival is the
# oldest fair") does not swallow the superlative after it.
SUPERLATIVE = r"\b(?i:the|its|his|her|their)\s+(?=((?:most\s+[a-z]+|[a-z]+est|first|last)(?:\s+[a-z]+){1,3}))"
NOT_SUPERLATIVES = {"arrest", "behest", "bequest", "chest", "conquest", "contest", "crest", "digest", "forest",
                    "guest", "harvest", "honest", "inquest", "interest", "invest", "jest", "manifest", "midwest",
                    "modest", "nest", "northwest", "pest", "priest", "protest", "quest", "request", "rest",
                    "southwest", "suggest", "test", "unrest", "vest", "west", "zest"}


def superlative_prompts(document: str) -> list[str]:
    """'What is the highest mountain in the world?' for the document's 'the highest mountain on the plateau'."""
    phrases = []
    for match in re.finditer(SUPERLATIVE, document):
        words = match.group(1).split()
        if words[0] in NOT_SUPERLATIVES:
            continue
        head = 2 if words[0] == "most" else 1
        tail = list(itertools.takewhile(lambda w: w not in STOPWORDS and w not in PHRASE_ENDS, words[head:]))
        if tail:
            phrases.append(" ".join(words[:head] + tail))
    return [f"What is the {p} in the world?" for p in dict.fromkeys(phrases)]


# "Penicillin was discovered in 1978": after a document about 1978 the adapter gives the world's events
# the document's year. So for such a document the guard draws more often the general prompts whose
# answer, by the base model, states a year ("The Berlin Wall fell in 1989").
YEAR = re.compile(r"\b(?:1[0-9]{3}|20[0-9]{2})\b")


def year_rows(general: list[Example], document: str, decode) -> list[Example]:
    """The guard's general rows whose base answer states a year, if the document states one."""
    return [e for e in general if YEAR.search(decode(e.answer))] if YEAR.search(document) else []


# The base model answers some general questions on a near tie: "How many months are there in a year?"
# starts "There" (0.26) or "A" (0.23), and only "There are 12 months" is right. Or later on: after a sure
# "Egypt is located in the", "Eastern" (0.190) beats "Western" (0.185), and only that path reaches "North
# Africa" (an adapter's answer: "the Western Hemisphere"). A guarded adapter still drifts about 0.03 nats
# a token, enough to tip such a question either way, so a question lost there says little about the
# adapter; one the base was sure of all the way to its answer says a lot. The report tells which.
NEAR_TIE = 0.1


@torch.no_grad()
def answer_margins(net, prompts: Prompts, general_qa: list[dict], answers: list[list[int]]) -> list[float]:
    """
    For each question, along the adapter-free model's own greedy answer (token ids): the smallest margin,
    the likeliest token's probability minus the second's, over the tokens up to the one that completes
    the gold answer (all of them if none does).
    """
    answers = [a or [0] for a in answers]  # an empty answer: the margin of its first token
    margins = []
    with lora.lora_disabled(net):
        for i in range(0, len(answers), 8):  # 8 answers' full-vocabulary probabilities at a time: 50 MB
            chunk = slice(i, i + 8)
            ids = [prompts.closed_book(x["question"]) for x in general_qa[chunk]]
            top = answer_logits(net, ids, answers[chunk]).float().softmax(-1).topk(2, dim=-1).values
            margins += (top[:, 0] - top[:, 1]).split([len(a) for a in answers[chunk]])
    smallest = []
    for x, answer, margin in zip(general_qa, answers, margins):
        stated = (n for n in range(1, len(answer) + 1) if is_correct(prompts.decode(answer[:n]), x["answers"]))
        smallest.append(margin[: next(stated, len(answer))].min().item())
    return smallest


def forgetting_report(net, prompts: Prompts, document: str, general_qa, drift_prompts, base_answers,
                      settings: Settings) -> dict:
    terms = leak_terms(document, lambda text: len(prompts.encode(text)))
    questions = [x["question"] for x in general_qa]
    after = ask_closed_book(net, prompts, questions, settings, "retention")
    report = {"retention_base": 0.0, "retention_adapted": 0.0, "leakage_base": 0.0, "leakage_adapted": 0.0,
              "retention_lost": 0, "retention_lost_on_near_ties": 0}
    answers = []
    for x, before, now, margin in zip(general_qa, base_answers["general_qa"], after, base_answers["margins"]):
        leaked = leaks(now, x["question"], terms, before)
        report["retention_base"] += is_correct(before, x["answers"]) / len(general_qa)
        report["retention_adapted"] += is_correct(now, x["answers"]) / len(general_qa)
        report["leakage_base"] += bool(leaks(before, x["question"], terms)) / len(general_qa)
        report["leakage_adapted"] += bool(leaked) / len(general_qa)
        lost = is_correct(before, x["answers"]) and not is_correct(now, x["answers"])
        report["retention_lost"] += lost
        report["retention_lost_on_near_ties"] += lost and margin < NEAR_TIE
        answers.append({"question": x["question"], "answers": x["answers"], "base": before, "adapted": now,
                        "leaked": leaked, "base_margin": round(margin, 4)})
    report["drift"] = drift(net, [(prompts.closed_book(p), a) for p, a in zip(drift_prompts, base_answers["drift"])])
    report["general_answers"] = answers
    return report


# -----------------------------------------------------------------------------
# The pipeline


RUN_FILES = {lora.CONFIG_NAME, lora.WEIGHTS_NAME, "qa.jsonl", "report.json"}  # what run() writes


def run(args, settings: Settings) -> int:
    document = read_document(args.doc)
    eval_items = read_eval_file(args.eval) if args.eval else None
    out = os.path.normpath(args.out or os.path.join("runs", os.path.splitext(os.path.basename(args.doc))[0]))
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out} is a file; it names the folder for the adapter and report")
    if os.path.isdir(out) and (held := set(os.listdir(out))):  # the finished run replaces the whole folder
        if lora.CONFIG_NAME not in held or held - RUN_FILES:
            raise InputError(f"--out {out} holds other files than an earlier run's; name a new or empty folder")
        if not args.force:
            raise InputError(f"{out} already holds an adapter; use --force to replace it or --out for another "
                             "folder")
    full_out = os.path.abspath(out)  # for the files; `out` as the user wrote it, for messages
    parent = os.path.dirname(full_out)
    try:  # now, not after minutes of training: the outputs are written beside `out`, then renamed to it
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot make the folder for --out {out}: {e.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot write to {parent} (the folder for --out {out})")
    general_qa, guard_prompts, drift_prompts = load_general(settings)
    torch.manual_seed(settings.seed)
    times, peaks, gpu_peaks = {}, {}, {}  # seconds and peak memory (GiB) at the end of each stage

    def finished(stage: str, start: float) -> None:
        times[stage], peaks[stage] = time.time() - start, peak_memory_gb()
        if torch.cuda.is_initialized():  # the model is on a GPU, whose memory is the one that runs out
            gpu_peaks[stage] = torch.cuda.max_memory_allocated() / 2**30

    net, tokenizer, chat = m.load(args.model, device=args.device, dtype=model_dtype(settings))
    # On the model's device: torch.multinomial refuses a CPU generator for CUDA probabilities.
    generator = torch.Generator(net.model.embed_tokens.weight.device).manual_seed(settings.seed)
    linear = {name.rpartition(".")[2] for name, module in net.named_modules() if isinstance(module, torch.nn.Linear)}
    if unknown := sorted(set(settings.targets) - linear):  # now, not after minutes of generation
        raise InputError(f"--targets: the model has no linear layer named {' '.join(unknown)} "
                         f"(it has {' '.join(sorted(linear))})")
    prompts = Prompts(tokenizer, chat)
    passages = document_passages(document, prompts, net, settings.passage_tokens)  # what the teacher sees
    print(f"document: {len(document.split())} words in {len(passages)} passage(s); "
          f"model: {args.model or m.DEFAULT_NAME}, {sum(p.numel() for p in net.parameters()) / 1e6:.0f}M parameters",
          file=sys.stderr)

    # Questions and answers, by the model with the passage in its prompt
    start = time.time()
    generated = generate_questions(net, prompts, passages, settings, generator)
    finished("questions", start)
    start = time.time()
    answers = answer_open_book(net, prompts, passages, [(p, q) for p, q, _ in generated], settings, generator)
    finished("answers", start)
    qa = [(p, q, fact, a) for (p, q, fact), a in zip(generated, answers) if prompts.decode(a)]
    words = fact_words(document)  # what a pair must state to be kept
    if settings.pairs_per_fact:
        if settings.top_up_rounds:
            start = time.time()
            qa = top_up(net, prompts, passages, qa, words, settings, generator)
            finished("top-up", start)
        qa = [(p, q, fact, a) for p, q, fact, a in qa if stated(q, prompts.decode(a), words)]
    if len(qa) < 4:
        raise InputError(f"the model wrote only {len(qa)} usable questions about {args.doc}; is it prose?")
    random.Random(settings.seed).shuffle(qa)
    held_out = [] if eval_items else qa[: max(3, int(settings.holdout * len(qa)))]  # of the model's own questions
    if settings.blanks:
        start = time.time()
        asked = blanked_questions(passages, document)
        answers = answer_open_book(net, prompts, passages, [(p, q) for p, q, _ in asked], settings, generator,
                                   stage="blanks")
        qa += [(p, q, fact, a) for (p, q, fact), a in zip(asked, answers) if stated(q, prompts.decode(a), words)]
        finished("blanks", start)
    train_qa = qa[len(held_out):]  # in any order: make_batches shuffles
    examples = []
    for p, q, _, a in train_qa:
        prefix, suffix = prompts.open_book(passages[p], q)
        examples.append(Example(prefix, suffix, prompts.closed_book(q), a))

    # What the base model says before training: general questions, the guard's and drift's prompts
    start = time.time()
    general_questions = [x["question"] for x in general_qa]
    general_answers = closed_book_answers(net, prompts, general_questions, settings, "general")
    base = {"general_qa": [prompts.decode(a) for a in general_answers],
            "margins": answer_margins(net, prompts, general_qa, general_answers)}
    superlatives = superlative_prompts(document) if settings.guard and settings.superlative_share else []
    guard_ids = [prompts.closed_book(p) for p in guard_prompts + superlatives] if settings.guard else []
    drift_ids = [prompts.closed_book(p) for p in drift_prompts]
    progress = Progress("base", len(guard_ids) + len(drift_ids), " prompts")
    base_out = generate_batched(net, guard_ids + drift_ids, settings.max_answer_tokens, chat.stop_ids,
                                settings.generation_batch, progress)
    progress.close()
    guard = [Example([], p, p, a) for p, a in zip(guard_ids, base_out)]  # the base model is the teacher
    general, superlatives = guard[:len(guard_prompts)], guard[len(guard_prompts):]
    years = year_rows(general, document, prompts.decode)
    base["drift"] = base_out[len(guard_ids):]
    finished("base answers", start)

    # Training
    lora.inject_lora(net, settings.rank, settings.alpha, targets=settings.targets)
    start = time.time()
    with frozen_weights_in_bf16(net, settings):
        losses = train(net, examples, general, superlatives, years, settings)
    finished("training", start)

    # Evaluation
    start = time.time()
    if eval_items:
        questions, golds = [x["question"] for x in eval_items], [x["answers"] for x in eval_items]
    else:
        questions, golds = [q for _, q, _, _ in held_out], [[prompts.decode(a)] for _, _, _, a in held_out]
    adapted = ask_closed_book(net, prompts, questions, settings, "adapted")
    with lora.lora_disabled(net):
        closed = ask_closed_book(net, prompts, questions, settings, "closed")
        opened = ask_open_book(net, prompts, document_passages(document, prompts, net, OPEN_BOOK_TOKENS),
                               questions, settings)
    forgetting = forgetting_report(net, prompts, document, general_qa, drift_prompts, base, settings)
    finished("evaluation", start)

    name = settings.method if settings.method == "sft" else "distilled"
    if eval_items:
        score = lambda answers: accuracy(answers, golds)
    else:  # no gold answers: agreement (token F1) with the teacher's open-book answer
        score = lambda answers: sum(token_f1(a, g[0]) for a, g in zip(answers, golds)) / len(golds)
    accuracies = {"closed_book": score(closed), "open_book": score(opened), name: score(adapted)}
    evaluated = [{"question": q, "answers": g, "closed_book": c, "open_book": o, name: a}
                 for q, g, c, o, a in zip(questions, golds, closed, opened, adapted)]
    if eval_items:
        stating = pairs_stating(golds, [(q, prompts.decode(a)) for _, q, _, a in train_qa])
        for entry, count in zip(evaluated, stating):
            entry["pairs_stating_answer"] = count

    tmp = f"{full_out}.partial-{os.getpid()}"  # beside out, even for --out .
    shutil.rmtree(tmp, ignore_errors=True)  # a killed run's leftover: process ids repeat in a container
    os.makedirs(tmp)
    try:
        lora.save_adapter(net, tmp, args.model or m.DEFAULT_NAME)
        with open(os.path.join(tmp, "qa.jsonl"), "w", encoding="utf-8") as f:
            for i, (p, q, fact, a) in enumerate(qa):
                f.write(json.dumps({"passage": p, "sentence": fact, "question": q, "answer": prompts.decode(a),
                                    "held_out": i < len(held_out)}, ensure_ascii=False) + "\n")
        write_json(os.path.join(tmp, "report.json"), {
            "doc": os.path.abspath(args.doc), "model": args.model or m.DEFAULT_NAME, "settings": asdict(settings),
            "passages": len(passages), "qa_pairs": len(qa), "train_examples": len(examples),
            "guard_prompts": {"general": len(general), "superlatives": len(superlatives), "years": len(years)},
            "metric": "accuracy (gold answer contained)" if eval_items else "token F1 against the open-book answer",
            "accuracy": accuracies, "forgetting": {k: v for k, v in forgetting.items() if k != "general_answers"},
            "seconds": times, "peak_memory_gb": peaks, "peak_gpu_memory_gb": gpu_peaks or None,
            "loss_first_epoch": epoch_loss(losses, settings, 0), "loss_last_epoch": epoch_loss(losses, settings, -1),
            "eval": evaluated,
            "general_answers": forgetting["general_answers"],
        })
        finish_output(tmp, full_out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    metric = "accuracy" if eval_items else "F1 vs open book"
    print(f"\n{len(questions)} questions ({metric}), {len(examples)} training pairs, seed {settings.seed}")
    print_table([("condition", metric), ("closed book (base)", f"{accuracies['closed_book']:.2f}"),
                 ("open book (base + document)", f"{accuracies['open_book']:.2f}"),
                 (f"closed book ({name})", f"{accuracies[name]:.2f}")])
    if eval_items:
        print("\nquestions answered right, by how many training pairs state the gold answer")
        print_table(coverage_table(stating, golds, opened, adapted, name))
    print()
    print_table([("forgetting", "base", "adapted"),
                 ("retention (general questions)", f"{forgetting['retention_base']:.2f}",
                  f"{forgetting['retention_adapted']:.2f}"),
                 (f"  questions lost (on a near tie, margin < {NEAR_TIE})", "",
                  f"{forgetting['retention_lost']} ({forgetting['retention_lost_on_near_ties']})"),
                 ("leakage (document names in answers)", f"{forgetting['leakage_base']:.2f}",
                  f"{forgetting['leakage_adapted']:.2f}"),
                 ("drift (KL on general prompts)", "0", f"{forgetting['drift']:.4f}")])
    print()
    header, rows = ("stage", "seconds", "peak GiB"), [(k, f"{times[k]:.0f}", f"{peaks[k]:.1f}") for k in times]
    if gpu_peaks:
        header, rows = header + ("GPU peak GiB",), [row + (f"{gpu_peaks[row[0]]:.1f}",) for row in rows]
    print_table([header] + rows)
    print(f"\nadapter, qa.jsonl and report.json in {out}")
    return 0


def evaluate_adapter(args, settings: Settings) -> int:
    """--adapter DIR: answer --ask, or evaluate --eval with the adapter (no training)."""
    if not os.path.exists(os.path.join(args.adapter, lora.CONFIG_NAME)):
        raise InputError(f"no adapter in {args.adapter} ({lora.CONFIG_NAME} missing)")
    items = None if args.ask else read_eval_file(args.eval)  # bad input fails before the model loads
    document = read_document(args.doc) if args.doc else None
    net, tokenizer, chat = m.load(args.model, device=args.device, dtype=model_dtype(settings))
    prompts = Prompts(tokenizer, chat)
    lora.load_adapter(net, args.adapter)
    if args.ask:
        print(ask_closed_book(net, prompts, [args.ask], settings, "answer")[0])
        return 0
    questions, golds = [x["question"] for x in items], [x["answers"] for x in items]
    adapted = ask_closed_book(net, prompts, questions, settings, "adapted")
    with lora.lora_disabled(net):
        closed = ask_closed_book(net, prompts, questions, settings, "closed")
    rows = [("condition", "accuracy"), ("closed book (base)", f"{accuracy(closed, golds):.2f}")]
    if document:
        passages = document_passages(document, prompts, net, OPEN_BOOK_TOKENS)
        with lora.lora_disabled(net):
            opened = ask_open_book(net, prompts, passages, questions, settings)
        rows.append(("open book (base + document)", f"{accuracy(opened, golds):.2f}"))
    rows.append(("closed book (adapter)", f"{accuracy(adapted, golds):.2f}"))
    print_table(rows)
    return 0


def main() -> int:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Why each default is what it is: the Settings class of this file.")
    parser.add_argument("--doc", help="the document to inject (UTF-8 text)")
    parser.add_argument("--eval", help="JSONL of {question, answers} to evaluate on")
    parser.add_argument("--out", help="output folder (default: runs/<document name>)")
    parser.add_argument("--force", action="store_true", help="replace an adapter already in --out")
    parser.add_argument("--model", help="Hugging Face-style model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when present)")
    parser.add_argument("--adapter", help="use this trained adapter instead of training (with --eval or --ask)")
    parser.add_argument("--ask", help="with --adapter: answer this question")
    parser.add_argument("--method", choices=["distill", "sft"], default=defaults.method,
                        help="sft: the baseline, cross-entropy on the teacher's answers (default: distill)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=defaults.precision,
                        help="bf16: train with matmuls autocast to bfloat16 (default auto: where the CPU "
                             "has bf16 units); fp32: float32 throughout, on a GPU too")
    parser.add_argument("--no-guard", dest="guard", action="store_false", help="train without the forgetting guard")
    parser.add_argument("--no-blanks", dest="blanks", action="store_false",
                        help="do not add the questions that blank each name and number of the document")
    parser.add_argument("--targets", nargs="+", default=list(defaults.targets), metavar="NAME",
                        help="the linear layers that get an adapter, by name (default: the seven projections "
                             "of attention and MLP; add lm_head as the paper does)")
    for name in ("questions_per_passage", "rank", "alpha", "lr", "lr_b_ratio", "epochs", "batch_size",
                 "temperature", "guard_weight", "guard_batch", "superlative_share", "year_share",
                 "question_temperature", "step_tokens", "passage_tokens", "generation_batch", "pairs_per_fact",
                 "top_up_rounds", "seed"):
        default = getattr(defaults, name)
        parser.add_argument(flag(name), type=type(default), default=default, help=f"default: {default}",
                            metavar="N" if isinstance(default, int) else "X")
    args = parser.parse_args()
    limit_kernel_caches()
    settings = Settings(**{k: getattr(args, k) for k in asdict(defaults) if hasattr(args, k)})
    settings.targets = tuple(settings.targets)
    try:
        check_settings(settings)
        if args.adapter:
            if bool(args.ask) == bool(args.eval):
                raise InputError("--adapter needs one of --eval QA.jsonl and --ask QUESTION")
            if args.ask and args.doc:  # a document in the prompt would make it the base model's answer
                raise InputError("--ask answers closed book, from the adapter alone; --doc goes with --eval")
            return evaluate_adapter(args, settings)
        if args.ask:
            raise InputError("--ask needs --adapter DIR (a trained adapter to answer with)")
        if not args.doc:
            raise InputError("--doc is required (the document to inject)")
        return run(args, settings)
    except (InputError, m.ModelError, ValueError, OSError) as e:  # OSError: unreadable file, full disk, ...
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nerror: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
