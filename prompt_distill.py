"""
Knowledge injection via prompt distillation (Kujanpää et al., arXiv 2412.14964), in plain PyTorch.

1. The model, with a passage of the document in its prompt, writes questions about the passage; each
   name and number of the document, blanked out of its sentence, is asked about too.
2. The teacher (the same model, the passage in its prompt) answers them; an answer that misses the
   facts of the sentence it was asked about is replaced by that sentence.
3. A student (the frozen model plus a LoRA adapter) sees only the question, and learns to match the
   teacher's next-token distributions on the answer tokens, by a temperature-scaled KL loss. A guard
   mixes in general prompts, most in the forms of the document's questions, on which the student
   matches the base model, so nothing else moves.
4. The student then answers closed book; the base model, closed and open book (as RAG), is the yardstick.

    python prompt_distill.py --doc data/lake_town.txt --eval data/lake_town.qa.jsonl
    python prompt_distill.py --doc notes/                       # every .txt and .md file, one adapter
    python prompt_distill.py --doc notes/ --pairs runs/notes/qa.jsonl --method sft   # the baseline, same pairs
    python prompt_distill.py --adapter runs/notes --doc new.md --out runs/notes2    # grow: learn one more
    python prompt_distill.py --adapter runs/lake_town --ask "Who founded Quillmere?"
"""

import argparse
import contextlib
import ctypes
import hashlib
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

import gguf_model
import lora
import model as m

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


class InputError(Exception):
    """Bad input from the user; the message is one line meant for a person."""


# -----------------------------------------------------------------------------
# Settings: the defaults suit SmolLM2-135M-Instruct on a CPU; MEASUREMENTS.md says why each is what it is.

@dataclass
class Settings:
    method: str = "distill"  # or "sft": the baseline, cross-entropy on the teacher's answers
    passage_tokens: int = 160  # the teacher reads about a paragraph at a time
    questions_per_passage: int = 50  # the paper writes 30 a paragraph
    question_temperature: float = 0.7  # a 135M model drifts off the sentence above this
    question_top_k: int = 50  # and only among the 50 likeliest tokens
    blanks: bool = True  # also ask for each name and number of the document, blanked out
    max_answer_tokens: int = 32  # the teacher is asked for "a few words"
    rank: int = 32  # of the LoRA matrices; 64 learned no more, and drifted further
    alpha: float = 32.0  # the update is scaled by alpha / rank
    targets: tuple = lora.DEFAULT_TARGETS  # the linear layers that get an adapter
    lr: float | None = None  # peak; None: from the model's size (lr_for), 1e-3 for the default model
    weight_decay: float = 0.1  # AdamW's, on the adapter only
    epochs: int = 4  # more learned more, past 10 minutes a run on 2 cores
    batch_size: int = 4  # questions a step
    warmup: float = 0.1  # share of the steps
    temperature: float = 1.0  # of the distillation loss
    guard: bool = True  # the forgetting guard
    guard_batch: int = 1  # general prompts mixed into each step
    guard_weight: float = 1.0  # of the guard's KL, against the document's loss
    form_share: float = 0.5  # of the guard's rows: general questions in the forms the document is asked in
    replay_batch: int = 2  # earlier documents' pairs mixed into each step when an adapter grows; 0: none
    holdout: float = 0.1  # share of the generated questions held out for scoring, when there is no --eval
    generation_batch: int = 64  # rows decoded together at most
    precision: str = "auto"  # "bf16": train under bfloat16 autocast; "auto": where the CPU has bf16 units
    seed: int = 0  # of the questions, the batches and the adapter's first weights: same seed, same adapter


def lr_for(net) -> float:
    """1e-3 for SmolLM2-135M, whose 106M parameters outside the embeddings it suits, and in inverse
    proportion to that count above it: 1e-3 made a 358M model drift 7x further than 3e-4, which it gives,
    at the same score on the document (MEASUREMENTS.md); for an 8B model it gives the paper's 1e-5 or so."""
    body = sum(p.numel() for name, p in net.named_parameters() if "embed_tokens" not in name and "lm_head" not in name)
    return float(f"{1e-3 * min(1.0, 106e6 / body):.1g}")


# -----------------------------------------------------------------------------
# The prompts. Teacher and student are scored on the same answer tokens; only their prompts differ:
#
#   teacher:  [chat start] {passage}\n\nAnswer the question using the text above, ... {question} [chat end]
#   student:  [chat start] {question} [chat end]
#
# The teacher's prompt is cut after the passage, so that the passage, shared by every question about
# it, runs once as a KV-cache prefix.

QUESTION_PROMPT = ('Turn this sentence from the text above into a question that asks for one of its details: '
                   '"{sentence}"\nWrite only the question.')
ANSWER_PROMPT = "Answer the question using the text above, in a few words.\nQuestion: {question}"


class Prompts:
    def __init__(self, tokenizer, chat: m.Chat):
        self.tokenizer, self.chat = tokenizer, chat

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def with_passage(self, passage: str, request: str) -> tuple[list[int], list[int]]:
        """(prefix, suffix): the chat-formatted passage, then the request; prefix + suffix is the prompt."""
        text = self.chat.render([{"role": "user", "content": f"{passage}\n\n{request}"}])
        cut = text.index(passage) + len(passage)  # the passage's end is a token boundary
        return self.encode(text[:cut]), self.encode(text[cut:])

    def teacher(self, passage: str, question: str) -> tuple[list[int], list[int]]:
        return self.with_passage(passage, ANSWER_PROMPT.format(question=question))

    def student(self, question: str) -> list[int]:
        return self.encode(self.chat.render([{"role": "user", "content": question}]))


# -----------------------------------------------------------------------------
# Words: what questions, blanks, the pair filter and scoring compare

ARTICLES = ("a", "an", "the")
STOPWORDS = set("the a an and or of in on at to for by with from as is was were be been are it its this that "
                "these those he she they his her their there here when where what which who whom how why "
                "not no yes but if then than so also each every all any some one".split())


def normalize(text: str) -> str:
    """Lowercase, no punctuation or articles, single spaces, as SQuAD's evaluation compares answers."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(w for w in text.split() if w not in ARTICLES)


def word_set(text: str) -> set[str]:
    return set(normalize(text).split())


def sentences(text: str) -> list[str]:
    """The sentences (or lines, for notes) of a text: the facts that questions are asked about."""
    pieces = re.split(r"(?<=[.!?])(?<!\bDr\.)(?<!\bMr\.)(?<!\bMs\.)(?<!\bMrs\.)(?<!\bSt\.)\s+|\n+", text)
    return [p.strip() for p in pieces if len(p.split()) >= 4]


def distinctive_terms(document: str) -> set[str]:
    """The document's names and numbers: capitalised words it never writes in lower case, and numbers."""
    words = re.findall(r"[A-Za-z][A-Za-z'\-]+", document)
    common = {w for w in words if w[0].islower()} | STOPWORDS
    names = {w for w in words if w[0].isupper() and w.lower() not in common and len(w) > 2}
    return names | set(re.findall(r"\b\d[\d,.]*\d\b", document))


def mentions(text: str, terms: set[str]) -> set[str]:
    """The terms that appear in text as whole words; "25" is not in "365.25"."""
    return {t for t in terms if re.search(rf"(?<![\w.,]){re.escape(t)}(?![\w]|[.,]\d)", text)}


# -----------------------------------------------------------------------------
# 1. The document, in passages that fit the teacher's prompt

def split_passages(text: str, count_tokens, max_tokens: int, level: int = 0) -> list[str]:
    """Paragraphs packed into passages of at most max_tokens; what does not fit is split into sentences,
    then words, then characters (a pasted URL)."""
    if count_tokens(text) <= max_tokens or level == 4:
        return [text]
    joiner, pattern = [("\n\n", r"\n\s*\n"), (" ", r"(?<=[.!?])\s+"), (" ", r"\s+"), ("", "")][level]
    parts = re.split(pattern, text) if pattern else list(text)
    passages = []
    for part in filter(None, (p.strip() if pattern else p for p in parts)):
        for piece in split_passages(part, count_tokens, max_tokens, level + 1):
            joined = f"{passages[-1]}{joiner}{piece}" if passages else piece
            if passages and count_tokens(joined) <= max_tokens:
                passages[-1] = joined
            else:
                passages.append(piece)
    return passages


# Open book shows the whole document when it fits in this many tokens, as a person would paste it into
# a chat; a longer one is split and each question gets the passage that matches it best, as RAG would.
OPEN_BOOK_TOKENS = 1024


def document_passages(document: str, prompts: Prompts, net, max_tokens: int) -> list[str]:
    """The document's passages for this model, leaving room in its context for a question and answer."""
    context = net.config.max_position_embeddings
    budget = min(max_tokens, context - min(512, context // 2))
    return split_passages(document, lambda s: len(prompts.encode(s)), budget)


# -----------------------------------------------------------------------------
# Generation, in batches, with progress for the person watching

def peak_memory_gb() -> float:
    """This process's peak resident memory so far."""
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**30 if sys.platform == "darwin" else 2**20)


STAGES = {}  # stage -> (seconds, peak GiB), as each Progress closes: the report's stage table


class Progress:
    """One line per stage: done/total, what the caller reports (loss, lr), time spent and left."""

    def __init__(self, stage: str, total: int, unit: str):
        self.stage, self.total, self.unit, self.done = stage, total, unit, 0
        self.start = self.shown = time.time()
        self.tty = sys.stderr.isatty()

    def update(self, n: int = 1, **info) -> None:
        self.done += n
        now = time.time()
        if now - self.shown < (0.5 if self.tty else 10) and self.done < self.total:
            return
        self.shown, elapsed = now, now - self.start
        left = elapsed / self.done * (self.total - self.done)
        extra = "".join(f"  {k} {v:.4g}" for k, v in info.items())
        line = f"{self.stage:<10} {self.done}/{self.total} {self.unit}{extra}  {elapsed:.0f}s, {left:.0f}s left"
        print(f"\r{line:<100}" if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)
        STAGES[self.stage] = (time.time() - self.start, peak_memory_gb())


GENERATION_KV_BYTES = 1.5 * 2**30  # a batch's KV cache at most: 32 rows of a 1,024-token page for SmolLM2-135M


def generate_batched(net, prompts: list[list[int]], max_new: int, stop_ids, batch_size: int, progress=None,
                     prefix=(), **sampling) -> list[list[int]]:
    """m.generate in batches of about equal size (a decode step of 13 rows costs nearly what 32 do), each
    small enough that its KV cache, every row holding a copy of the prefix, fits GENERATION_KV_BYTES."""
    if not prompts:
        return []
    row_tokens = len(prefix) + max(map(len, prompts)) + max_new
    row_bytes = m.KVCache.bytes_per_token(net.config, net.model.embed_tokens.weight.dtype) * row_tokens
    batches = math.ceil(len(prompts) / max(1, min(batch_size, int(GENERATION_KV_BYTES // row_bytes))))
    bounds = [len(prompts) * i // batches for i in range(batches + 1)]
    out = []
    for start, end in zip(bounds, bounds[1:]):
        out += m.generate(net, prompts[start:end], max_new, stop_ids, prefix=prefix, **sampling)
        if progress:
            progress.update(end - start)
    return out


# -----------------------------------------------------------------------------
# 2. Questions, written by the model about each passage, and the teacher's answers

MAX_QUESTION_TOKENS = 32


def parse_question(text: str) -> str | None:
    """The first line that is a question, numbering and labels stripped; None if there is none."""
    for line in text.splitlines():
        line = re.sub(r"^\s*(?:\d+[.)]|[-*\u2022]|Q\d*[:.])\s*", "", line).strip()
        line = re.sub(r"^[^?]*?(?:question|write)[^?:]*:\s*", "", line, flags=re.I).strip(' "')  # "Question: ..."
        if line.endswith("?") and 3 <= len(line.split()) <= 40 and not re.search(
                r"\b(text|passage|document|article|paragraph|sentence|fact|facts|question)\b", line, re.I):
            return line
    return None


def near_duplicate(a: set, b: set) -> bool:
    return len(a & b) / max(1, len(a | b)) > 0.7


def write_questions(net, prompts: Prompts, passages: list[str], settings: Settings,
                    generator) -> list[tuple[int, str, str]]:
    """
    (passage index, question, sentence asked about): up to questions_per_passage a passage. Each call shows
    the whole passage and points at one sentence: asked about a whole text, a small model writes a few
    vague questions again and again.
    """
    asked = []  # for each passage, its sentences, each asked about several times at a high temperature
    for passage in passages:
        facts = sentences(passage) or [passage]
        per_fact = math.ceil(1.5 * settings.questions_per_passage / len(facts))  # a third are dropped below
        asked.append([fact for fact in facts for _ in range(per_fact)])
    progress = Progress("questions", sum(map(len, asked)), "calls")
    questions = []
    for index, (passage, facts) in enumerate(zip(passages, asked)):
        prefix, _ = prompts.with_passage(passage, "")
        requests = [prompts.with_passage(passage, QUESTION_PROMPT.format(sentence=f))[1] for f in facts]
        outputs = generate_batched(net, requests, MAX_QUESTION_TOKENS, prompts.chat.stop_ids,
                                   settings.generation_batch, progress, prefix, generator=generator,
                                   temperature=settings.question_temperature, top_k=settings.question_top_k)
        names, kept, seen = distinctive_terms(passage), [], []
        for fact, output in zip(facts, outputs):
            q = parse_question(prompts.decode(output))
            # A question that names nothing of the passage makes no sense without it.
            if q is None or (names and not mentions(q, names)) or any(near_duplicate(word_set(q), s) for s in seen):
                continue
            seen.append(word_set(q))
            kept.append((index, q, fact))
        random.Random(settings.seed).shuffle(kept)
        # Each sentence's first phrasing before any sentence's second: the cap keeps every fact asked about.
        nth = [sum(j[2] == k[2] for j in kept[:i]) for i, k in enumerate(kept)]  # k's phrasing of its sentence
        questions += [k for _, k in sorted(zip(nth, kept), key=lambda x: x[0])][: settings.questions_per_passage]
    progress.close()
    return questions


def teacher_answers(net, prompts: Prompts, passages: list[str], asked: list[tuple[int, str]], settings: Settings,
                    stage: str) -> list[list[int]]:
    """The teacher's greedy answer ids, ending in the end-of-turn token, to each (passage index, question)."""
    progress = Progress(stage, len(asked), "questions")
    answers = [None] * len(asked)
    for index, passage in enumerate(passages):
        rows = [i for i, (p, _) in enumerate(asked) if p == index]
        prefix, _ = prompts.with_passage(passage, "")
        suffixes = [prompts.teacher(passage, asked[i][1])[1] for i in rows]
        outputs = generate_batched(net, suffixes, settings.max_answer_tokens, prompts.chat.stop_ids,
                                   settings.generation_batch, progress, prefix)
        for i, output in zip(rows, outputs):
            answers[i] = output
    progress.close()
    return answers


# Blanks: the model's own questions skip some facts however often it is asked, so each name and number
# of each sentence is also blanked out, for the teacher to fill in from the passage.
NAME_RUN = r"[A-Z][\w'\-]*(?: (?:of |the )?[A-Z][\w'\-]*)*"  # "the Museum of Lake Crafts"
NAME_OR_NUMBER = re.compile(NAME_RUN + r"|\b\d[\d,.]*\d\b")
BLANKS = ("Fill in the blank:", "Complete the sentence:")


def blanked_questions(passages: list[str], doc_of: list[int], documents: list[str]) -> list[tuple[int, str, str]]:
    """(passage index, question, sentence) for each run of capitalised words that holds a name of the
    passage's document, and each number of two digits or more; a name in more than four sentences is what
    the document is about ("Quillmere"), not a fact, and stays."""
    spreads = [{t: sum(t in s for s in sentences(d)) for t in distinctive_terms(d)} for d in documents]
    questions = []
    for index, passage in enumerate(passages):
        spread = spreads[doc_of[index]]  # term -> sentences of the document that hold it
        for sentence in sentences(passage):
            for match in NAME_OR_NUMBER.finditer(sentence):
                span = match.group(0).rstrip(".,")
                names = [w.removesuffix("'s") for w in span.split() if w.removesuffix("'s") in spread]
                opening_word = match.start() == 0 and " " not in span and not span[0].isdigit()  # "Because"
                if not names or min(spread[w] for w in names) > 4 or opening_word:
                    continue
                before, after = sentence[:match.start()], sentence[match.start() + len(span):]
                questions.append((index, f'{BLANKS[0]} "{before}___{after}"', sentence))
                if len(before.split()) >= 3:
                    questions.append((index, f'{BLANKS[1]} "{before.rstrip()} ..."', sentence))
    return questions


def fact_words(document: str) -> set[str]:
    """The words that name one fact: the document's names and numbers, and words in only one sentence."""
    counts = {}
    for sentence in sentences(document):
        for w in word_set(sentence) - STOPWORDS:
            counts[w] = counts.get(w, 0) + 1
    return {w for w, n in counts.items() if n == 1} | {normalize(t) for t in distinctive_terms(document)}


def stated(question: str, answer: str, words: set[str]) -> set[str]:
    """The fact words an answer adds to its question: what the pair teaches. "Is Odessa Marchbank the
    mayor?" answered "Odessa Marchbank is the mayor." teaches nothing, and such pairs are dropped."""
    return (word_set(answer) - word_set(question)) & words


def checked_answer(question: str, sentence: str, answer: list[int], words: set[str], prompts: Prompts):
    """The teacher's answer if it states a fact of the sentence it was asked about, else the sentence itself,
    which is right by construction (a 135M teacher fills a blanked name with another line); None when the
    question leaves nothing of its sentence to state. The student learns facts in question form either way."""
    facts = stated(question, sentence, words)
    if not facts:
        return None
    # a line of notes as plain text: no bullet, heading mark or markdown emphasis
    plain = re.sub(r"^\s*(?:[-*+>]|#+)\s+|\*\*|__|`", "", sentence)
    return answer if stated(question, prompts.decode(answer), words) & facts else \
        prompts.encode(plain) + prompts.chat.stop_ids[:1]


# -----------------------------------------------------------------------------
# 3. The loss

def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float):
    """
    KL(teacher || student) of the temperature-softened distributions, (tokens, vocab) logits, averaged
    over tokens and times T^2 (Hinton et al. 2015), so that the gradient keeps its size as T grows:
    d loss / d student_logits = T * (softmax(student / T) - softmax(teacher / T)) / tokens.
    """
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2


def pack(prompts: list[list[int]], answers: list[list[int]], prefix_len: int = 0):
    """
    Right-padded rows of prompt + answer: ids (B, T), attention mask (B, prefix_len + T), and `select`
    (B, T), true at the positions whose next token is an answer token (position t predicts token t + 1).
    """
    B, T = len(prompts), max(len(p) + len(a) for p, a in zip(prompts, answers))
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, prefix_len + T, dtype=torch.long)
    mask[:, :prefix_len] = 1
    select = torch.zeros(B, T, dtype=torch.bool)
    for row, (p, a) in enumerate(zip(prompts, answers)):
        ids[row, : len(p) + len(a)] = torch.tensor(p + a)
        mask[row, prefix_len: prefix_len + len(p) + len(a)] = 1
        select[row, len(p) - 1: len(p) + len(a) - 1] = True
    return ids, mask, select


def answer_hidden(net, prompts: list[list[int]], answers: list[list[int]], prefix: list[int] = ()) -> torch.Tensor:
    """
    The final hidden states that predict each answer token, (answer tokens, hidden), rows in order. Every
    row starts with `prefix`, which runs once (with gradients, when they are on) and is shared by the batch.
    """
    device = net.model.embed_tokens.weight.device
    ids, mask, select = (t.to(device) for t in pack(prompts, answers, len(prefix)))
    cache = m.prefill(net, list(prefix)).expand(len(prompts), len(prefix) + ids.shape[1]) if prefix else None
    return net(ids, mask, cache, return_hidden=True)[select]  # only these positions meet the large lm_head


def common_start(rows: list[list[int]]) -> list[int]:
    """The tokens all rows start with, leaving each at least one of its own: the chat's system prompt."""
    n = min(map(len, rows)) - 1
    return rows[0][: next((i for i in range(n) if any(r[i] != rows[0][i] for r in rows)), n)]


# -----------------------------------------------------------------------------
# Precision: bfloat16 where it pays

def cpu_has_bf16_units() -> bool:
    """AVX512-BF16 or AMX (Linux): there bf16 matmuls beat float32 ones."""
    try:
        with open("/proc/cpuinfo") as f:
            return bool(re.search(r"\bavx512_bf16\b|\bamx_bf16\b", f.read()))
    except OSError:
        return False


def uses_autocast(net, settings: Settings) -> bool:
    """bfloat16 autocast for a float32 model's training where the CPU has bf16 units: steps ran 1.2-1.6x
    faster. A GPU model is bfloat16 already."""
    device = net.model.embed_tokens.weight.device.type
    wanted = settings.precision == "bf16" or (settings.precision == "auto" and device == "cpu" and cpu_has_bf16_units())
    return wanted and net.model.embed_tokens.weight.dtype == torch.float32


def autocast_for(net, settings: Settings):
    # cache_enabled=False, or autocast would keep its bf16 copy of each LoRA weight and miss the optimizer's steps
    return torch.autocast(net.model.embed_tokens.weight.device.type, dtype=torch.bfloat16,
                          enabled=uses_autocast(net, settings), cache_enabled=False)


@contextlib.contextmanager
def frozen_weights_in_bf16(net, settings: Settings):
    """Under autocast each forward pass casts every frozen weight anew and keeps the casts for backward;
    cast once instead (the same numbers, 0.24 GiB less), and put the float32 weights back afterwards."""
    frozen = [mod for mod in net.modules() if isinstance(mod, torch.nn.Linear) and not mod.weight.requires_grad
              and uses_autocast(net, settings)]
    float32 = [mod.weight for mod in frozen]
    for mod in frozen:  # a new Parameter: a tied lm_head's weight is the embedding's, which stays float32
        mod.weight = torch.nn.Parameter(mod.weight.to(torch.bfloat16), requires_grad=False)
    try:
        yield
    finally:
        for mod, weight in zip(frozen, float32):
            mod.weight = weight
        with contextlib.suppress(OSError, AttributeError, TypeError):  # glibc only
            ctypes.CDLL(None).malloc_trim(0)  # hand training's freed memory back: it would add to evaluation's peak


# oneDNN, which runs a CPU's bf16 matmuls, caches a kernel (about 1 MB) per matrix shape, up to 1,024 of
# them; the teacher meets every passage's length, so it grew with the document. 64 keep the speed.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
os.environ.setdefault("LRU_CACHE_CAPACITY", "64")


# -----------------------------------------------------------------------------
# 4. Training

ASKING = set("i me my we our you your can could will would should may might must do does did have has had "
             "please tell whats".split())  # the words of asking, in questions of every form


def form_weights(general: list[str], questions: list[str], document: str) -> list[int]:
    """For each general prompt, how many of the document's questions share a word of its form: an adapter
    carries the document into the world's answers in the forms it learned it in ("What is the capital of
    ...?"), so the guard asks the world in those forms most. A form is a question less its stop words and
    the document's names, each word cut to five letters ("founded", "founder")."""
    names = word_set(" ".join(distinctive_terms(document)))
    def form(text: str) -> set[str]:
        return {w.removesuffix("s")[:5] for w in word_set(text) - STOPWORDS - ASKING - names}
    forms = [form(q) for q in questions]
    return [sum(bool(form(g) & f) for f in forms) for g in general]


def draw_guard(general: list, weights: list[int], settings, rng: random.Random) -> list:
    """A step's guard rows: with probability form_share drawn by form weight, else any general prompt."""
    rows = []
    for _ in range(settings.guard_batch if general else 0):
        by_form = rng.random() < settings.form_share and any(weights)
        rows.append(rng.choices(general, weights)[0] if by_form else rng.choice(general))
    return rows


@dataclass
class Example:
    passage: list[int]  # the start of the teacher's prompt, up to the passage's end; empty for a guard row
    teacher: list[int]  # the rest of the teacher's prompt
    student: list[int]  # the student's prompt: the question alone
    answer: list[int]  # the tokens both are scored on
    target: torch.Tensor | None = None  # the teacher's final hidden states on the answer (compute_targets)


@torch.no_grad()
def compute_targets(net, examples: list[Example], settings: Settings) -> None:
    """
    The teacher is the model with its adapters off, so its outputs never change: they are computed once,
    as final hidden states (576 numbers a token, not 49,152 logits), and lm_head turns them into logits at
    each step. A guard row's teacher prompt is the student's own: the base model is its teacher.
    """
    progress = Progress("targets", len(examples), "examples")
    by_passage = {}
    for e in examples:
        by_passage.setdefault(tuple(e.passage), []).append(e)
    with lora.lora_disabled(net), autocast_for(net, settings):
        for passage, rows in by_passage.items():
            rows.sort(key=lambda e: len(e.teacher) + len(e.answer))  # rows of like length pad less
            for i in range(0, len(rows), 16):
                chunk = rows[i:i + 16]
                hidden = answer_hidden(net, [e.teacher for e in chunk], [e.answer for e in chunk], passage)
                for e, h in zip(chunk, hidden.split([len(e.answer) for e in chunk])):
                    e.target = h.clone()  # not a view, which would keep the whole chunk alive
                progress.update(len(chunk))
    progress.close()


def teacher_logits(net, rows: list[Example]) -> torch.Tensor:
    with torch.no_grad(), lora.lora_disabled(net):  # lm_head may carry an adapter too
        return net.lm_head(torch.cat([e.target for e in rows]))


def batch_loss(net, batch: list[Example], guard: list[Example], settings: Settings):
    """
    (document loss, guard loss) of one step, the document's questions and the guard's prompts in one
    forward pass. What every student prompt starts with (the chat's system prompt) runs once, as a prefix.
    """
    rows = batch + guard
    shared = common_start([e.student for e in rows])
    student = net.lm_head(answer_hidden(net, [e.student[len(shared):] for e in rows], [e.answer for e in rows],
                                        shared))
    on_document = sum(len(e.answer) for e in batch)
    if settings.method == "sft":
        answer = torch.tensor([t for e in batch for t in e.answer], device=student.device)
        loss = F.cross_entropy(student[:on_document].float(), answer)
    else:
        loss = distillation_loss(student[:on_document], teacher_logits(net, batch), settings.temperature)
    if not guard:
        return loss, torch.zeros_like(loss)
    return loss, distillation_loss(student[on_document:], teacher_logits(net, guard), settings.temperature)


def make_batches(examples: list[Example], batch_size: int, rng: random.Random) -> list[list[Example]]:
    """Batches in random order, each of examples of about one length: padding costs time on a CPU."""
    examples = examples[:]
    rng.shuffle(examples)  # ties in length are broken at random, so the batches differ between epochs
    examples.sort(key=lambda e: len(e.student) + len(e.answer))
    batches = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
    rng.shuffle(batches)
    return batches


def train(net, examples: list[Example], guard: list[Example], weights: list[int], settings: Settings,
          replay: list[Example] = ()) -> list[float]:
    """Trains the adapter on the examples, with guard rows drawn by draw_guard in each step and, when it
    grows, replay_batch of the earlier documents' pairs, so that it keeps them; returns the losses."""
    replay = list(replay)
    compute_targets(net, (examples + replay if settings.method == "distill" else []) + guard, settings)
    autocast = autocast_for(net, settings)
    rng = random.Random(settings.seed)
    batches = [batch for _ in range(settings.epochs) for batch in make_batches(examples, settings.batch_size, rng)]
    optimizer = torch.optim.AdamW(lora.lora_parameters(net), lr=settings.lr, weight_decay=settings.weight_decay)
    warmup = max(1, int(settings.warmup * len(batches)))
    progress = Progress("training", len(batches), "steps")
    losses = []
    net.train()
    for step, batch in enumerate(batches):
        # linear warm-up, then cosine decay to zero
        decay = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, len(batches) - warmup)))
        lr = settings.lr * ((step + 1) / warmup if step < warmup else decay)
        for group in optimizer.param_groups:
            group["lr"] = lr
        guard_rows = draw_guard(guard, weights, settings, rng)
        replayed = rng.sample(replay, min(settings.replay_batch, len(replay)))  # none when not growing
        with autocast:  # the forward pass; backward runs outside, as autocast wants
            loss, on_guard = batch_loss(net, batch + replayed, guard_rows, settings)
            total = loss + settings.guard_weight * on_guard
        total.backward()
        norm = torch.nn.utils.clip_grad_norm_(lora.lora_parameters(net), 1.0).item()
        for what, value in (("loss", total.item()), ("gradient norm", norm)):  # bf16 can overflow in backward
            if not math.isfinite(value):
                raise InputError(f"{what} became {value} at step {step + 1}; try a lower --lr (no adapter was written)")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress.update(loss=sum(losses[-10:]) / len(losses[-10:]), lr=lr)
    progress.close()
    net.eval()
    return losses


# -----------------------------------------------------------------------------
# 5. Evaluation: the student closed book, against the base model closed and open book

def read_eval_file(path: str) -> list[dict]:
    """{"question": ..., "answers": [...]} lines; a bad line is named."""
    if not os.path.isfile(path):
        raise InputError(f"eval file not found: {path}")
    items = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line.decode("utf-8-sig" if number == 1 else "utf-8"))
            except UnicodeDecodeError:
                raise InputError(f"{path}, line {number}: not UTF-8 text") from None
            except ValueError:
                item = None
            if not (isinstance(item, dict) and isinstance(item.get("question"), str) and item["question"].strip()
                    and isinstance(item.get("answers"), list) and item["answers"]
                    and all(isinstance(a, str) and a.strip() for a in item["answers"])):
                raise InputError(f'{path}, line {number}: expected {{"question": "...", "answers": ["...", ...]}}')
            items.append({"eval": path, "question": item["question"], "answers": item["answers"]})
    if not items:
        raise InputError(f"{path} holds no questions")
    return items


def answer_words(text: str) -> list[str]:
    """Lowercase words without articles; 9,000 is 9000, a decimal or a time is one word (1.5 holds no 5),
    and every other mark splits words ("24-hour" holds 24)."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.lower())
    text = re.sub(r"(?<=\d)\.0+\b", "", text)  # 100.0 is 100
    return [w for w in re.findall(r"\d+(?:[.:]\d+)*|\w+", text) if w not in ARTICLES]


def is_correct(answer: str, golds: list[str]) -> bool:
    """The answer holds one gold's words in order, as whole words: "120 months" is not 12."""
    answer = f" {' '.join(answer_words(answer))} "
    return any(gold and f" {' '.join(gold)} " in answer for gold in map(answer_words, golds))


def token_f1(answer: str, gold: str) -> float:
    a, g = answer_words(answer), answer_words(gold)
    common = sum(min(a.count(w), g.count(w)) for w in set(a) & set(g))
    return 0.0 if common == 0 else 2 * common / (len(a) + len(g))


def best_passage(passages: list[str], question: str) -> int:
    """Retrieval for open book: the passage that shares the most words with the question."""
    words = word_set(question) - STOPWORDS
    return max(range(len(passages)), key=lambda i: len(words & word_set(passages[i])))


def closed_book(net, prompts: Prompts, questions: list[str], settings: Settings, stage: str) -> list[list[int]]:
    """Greedy answer ids, each question alone in the prompt."""
    progress = Progress(stage, len(questions), "questions")
    answers = generate_batched(net, [prompts.student(q) for q in questions], settings.max_answer_tokens,
                               prompts.chat.stop_ids, settings.generation_batch, progress)
    progress.close()
    return answers


def evaluate(net, prompts: Prompts, items: list[dict], passages: list[str] | None, name: str, settings: Settings,
             by_f1: bool = False) -> tuple[list[dict], dict]:
    """Each question answered by the adapter, and by the base model closed book and (given passages) open
    book; returns the answers, and each condition's accuracy (token F1 with by_f1) by eval file, and pooled
    over the files when there are several."""
    questions = [x["question"] for x in items]
    answers = {name: closed_book(net, prompts, questions, settings, name)}
    with lora.lora_disabled(net):
        answers["closed_book"] = closed_book(net, prompts, questions, settings, "closed")
        if passages:
            answers["open_book"] = teacher_answers(net, prompts, passages,
                                                   [(best_passage(passages, q), q) for q in questions], settings,
                                                   "open book")
    answers = {k: [prompts.decode(a) for a in v] for k, v in answers.items()}
    entries = [{**x, **{k: v[i] for k, v in answers.items()}} for i, x in enumerate(items)]
    score = (lambda a, g: token_f1(a, g[0])) if by_f1 else is_correct
    groups = {}
    for e in entries:
        groups.setdefault(e["eval"], []).append(e)
    if len(groups) > 1:
        groups["pooled"] = entries
    return entries, {g: {k: sum(score(e[k], e["answers"]) for e in rows) / len(rows) for k in answers}
                     for g, rows in groups.items()}


# -----------------------------------------------------------------------------
# 6. Forgetting: general questions the base model answers right, and the document's names in them

def leak_terms(document: str, count_tokens) -> set[str]:
    """
    The names and numbers that give the document away in an unrelated answer: its distinctive terms,
    less the names the tokenizer keeps whole (a common word: " Museum"; an invented name comes in pieces:
    " Quillmere"), plus its names of several words ("Blue Hour").
    """
    terms = {t.removesuffix("'s") for t in distinctive_terms(document)}
    phrases = set()
    for run in re.findall(NAME_RUN, document):  # "The Blue Hour Society": the terms side by side
        for is_term, words in itertools.groupby(run.split(), key=lambda w: w in terms):
            if is_term and len(words := list(words)) > 1:
                phrases.add(" ".join(words))
    return phrases | {t for t in terms if t[0].isdigit() or ("'" not in t and count_tokens(" " + t) > 1)}


def leaks(answer: str, question: str, terms: set[str], base_answer: str = "") -> list[str]:
    """The document's terms in an answer, less those its question names ("the longest river?" asks for a
    River) and those the base model, which never saw the document, said too."""
    return sorted(t for t in mentions(answer, terms) - mentions(base_answer, terms) if t.lower() not in question.lower())


@torch.no_grad()
def drift(net, rows: list[tuple[list[int], list[int]]]) -> float:
    """Mean KL(base || adapted) per token along the base model's own answers to general prompts."""
    total = 0.0
    for i in range(0, len(rows), 8):
        prompts, answers = zip(*rows[i:i + 8])
        adapted = net.lm_head(answer_hidden(net, prompts, answers))
        with lora.lora_disabled(net):
            base = net.lm_head(answer_hidden(net, prompts, answers))
        total += distillation_loss(adapted, base, 1.0).item() * len(adapted)
    return total / sum(len(a) for _, a in rows)


def load_general(seed: int) -> tuple[list[dict], list[str], list[str]]:
    """General questions (retention, leakage), and general prompts split into the guard's and drift's."""
    general_qa = read_eval_file(os.path.join(DATA, "general_qa.jsonl"))
    with open(os.path.join(DATA, "general_prompts.txt"), encoding="utf-8") as f:
        general = [line.strip() for line in f if line.strip()]
    random.Random(seed).shuffle(general)
    held_out = max(8, len(general) // 5)  # drift is measured on prompts the guard never trained on
    return general_qa, general[held_out:], general[:held_out]


def forgetting(net, prompts: Prompts, documents: list[str], settings: Settings) -> dict:
    """Retention and leakage on the general questions, and drift on the prompts the guard never trained on."""
    general_qa, _, drift_prompts = load_general(settings.seed)
    terms = set().union(*(leak_terms(d, lambda t: len(prompts.encode(t))) for d in documents))
    questions = [x["question"] for x in general_qa]
    adapted = [prompts.decode(a) for a in closed_book(net, prompts, questions, settings, "retention")]
    with lora.lora_disabled(net):
        base = [prompts.decode(a) for a in closed_book(net, prompts, questions, settings, "retention, base")]
        drift_ids = [prompts.student(p) for p in drift_prompts]
        drift_answers = generate_batched(net, drift_ids, settings.max_answer_tokens, prompts.chat.stop_ids,
                                         settings.generation_batch)
    right = [(is_correct(b, x["answers"]), is_correct(a, x["answers"])) for x, b, a in zip(general_qa, base, adapted)]
    leaked = [leaks(a, x["question"], terms, b) for x, b, a in zip(general_qa, base, adapted)]
    n = len(general_qa)
    return {
        "retention_base": sum(b for b, _ in right) / n, "retention_adapted": sum(a for _, a in right) / n,
        "retention_lost": sum(b and not a for b, a in right),
        "leakage_base": sum(bool(leaks(b, x["question"], terms)) for x, b in zip(general_qa, base)) / n,
        "leakage_adapted": sum(map(bool, leaked)) / n,
        "drift": drift(net, list(zip(drift_ids, drift_answers))),
        "answers": [{"question": x["question"], "answers": x["answers"], "base": b, "adapted": a, "leaked": lk}
                    for x, b, a, lk in zip(general_qa, base, adapted, leaked)],
    }


# -----------------------------------------------------------------------------
# Inputs and outputs. A run writes into a folder beside --out, renamed into place once whole.

RUN_FILES = {lora.CONFIG_NAME, lora.WEIGHTS_NAME, "qa.jsonl", "report.json"}


def document_files(paths: list[str]) -> list[str]:
    """The files --doc names: each file, and each folder's .txt and .md files, recursively, in sorted order;
    hidden files and folders (.git, .obsidian) are left out."""
    files = []
    for path in paths:
        if not os.path.isdir(path):
            files.append(path)
            continue
        found = []
        for folder, subfolders, names in os.walk(path):
            subfolders[:] = [d for d in subfolders if not d.startswith(".")]
            found += [os.path.join(folder, n) for n in names if n.endswith((".txt", ".md")) and not n.startswith(".")]
        if not found:
            raise InputError(f"{path} holds no .txt or .md file" + ("" if os.listdir(path) else " (it is empty)"))
        files += sorted(found)
    return list(dict.fromkeys(os.path.normpath(f) for f in files))  # each file once


def read_document(path: str) -> str:
    """A document's text; a file that is not UTF-8 text stops the run, even among good ones: an adapter
    that silently lacked a note would be worse than one line to fix before any work."""
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


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def model_name(args) -> str:
    return os.path.abspath(args.model) if args.model is not None else gguf_model.DEFAULT_NAME


PAIR_FIELDS = {"passage_sha256": str, "question": str, "answer": str, "answer_ids": list, "held_out": bool}


def read_pairs(path: str) -> list[tuple[int, dict]]:
    """(line number, pair) for each line of a run's qa.jsonl, checked."""
    if not os.path.isfile(path):
        raise InputError(f"pairs file not found: {path}")
    pairs = []
    with open(path, encoding="utf-8") as f:
        for number, line in filter(lambda x: x[1].strip(), enumerate(f, 1)):
            with contextlib.suppress(ValueError):
                pair = json.loads(line)
                if isinstance(pair, dict) and all(isinstance(pair.get(k), t) for k, t in PAIR_FIELDS.items()):
                    pairs.append((number, pair))
                    continue
            raise InputError(f"{path}, line {number}: not a pair of a run's qa.jsonl")
    if not pairs:
        raise InputError(f"{path} holds no pairs")
    return pairs


def pairs_in(lines: list[tuple[int, dict]], path: str, keys: list[str], prompts: Prompts) -> tuple[list, int]:
    """read_pairs' pairs as make_pairs gives them, the held-out ones first, each found among the passages
    whose keys (passage_sha256) these are."""
    where = {key: i for i, key in enumerate(keys)}
    held, trained = [], []
    for number, pair in lines:
        if pair["passage_sha256"] not in where:
            raise InputError(f"{path}, line {number}: its passage, of {pair.get('doc', 'another document')}, is not "
                             f"in the documents given (or --passage-tokens differs)")
        ids = pair["answer_ids"]
        if prompts.decode(ids) != pair["answer"]:  # an answer edited by hand, or another model's tokens
            ids = prompts.encode(pair["answer"]) + prompts.chat.stop_ids[:1]
        row = (where[pair["passage_sha256"]], pair["question"], pair.get("sentence", ""), ids)
        (held if pair["held_out"] else trained).append(row)
    return held + trained, len(held)


def earlier_documents(adapter: str, model: str | None) -> list[tuple[str, str]]:
    """(path, text) of each document an adapter learned, as its run's report.json lists them, unchanged since;
    none if it has no such report (PEFT's adapters). Refuses an adapter of another model, when one is given."""
    try:
        with open(os.path.join(adapter, "report.json"), encoding="utf-8") as f:
            report = json.load(f)
        listed = [(d["path"], d["sha256"]) for d in report["documents"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    if model is not None and report.get("model") != model:
        raise InputError(f"--adapter {adapter} was trained on {report.get('model')}, not {model}")
    documents = []
    for path, sha256 in listed:
        if not os.path.isfile(path):
            raise InputError(f"{path}, a document of --adapter {adapter}, is gone; its pairs are replayed from it")
        if digest(text := read_document(path)) != sha256:
            raise InputError(f"{path} has changed since --adapter {adapter} learned it")
        documents.append((path, text))
    return documents


def process_alive(pid: int) -> bool:
    if os.name != "posix":  # elsewhere os.kill does not just ask
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, but another user's
        pass
    return True


def start_output(out: str, force: bool) -> str:
    """Checks --out before any work, and makes the folder that the outputs are written into."""
    full, real, cwd = os.path.abspath(out), os.path.realpath(out), os.path.realpath(os.getcwd())
    if cwd == real or cwd.startswith(real.rstrip(os.sep) + os.sep):
        raise InputError(f"--out {out} is the folder you are in, or holds it; name a new folder")
    if os.path.exists(full) and not os.path.isdir(full):
        raise InputError(f"--out {out} is a file; it names the folder for the outputs")
    if os.path.isdir(full) and (held := set(os.listdir(full))):  # the finished run replaces the whole folder
        if held - RUN_FILES:
            raise InputError(f"--out {out} holds other files than an earlier run's; name a new or empty folder")
        if not force:
            raise InputError(f"{out} already holds a run; use --force to replace it or --out for another folder")
    if os.path.ismount(full):
        raise InputError(f"--out {out} is a mount point, which cannot be replaced; name a folder inside it")
    parent, name = os.path.split(full)
    for leftover in os.listdir(parent) if os.path.isdir(parent) else []:  # of a run that was killed
        pid = re.fullmatch(re.escape(name) + r"\.(?:partial|old)-(\d+)", leftover)
        if pid and not process_alive(int(pid.group(1))):
            shutil.rmtree(os.path.join(parent, leftover), ignore_errors=True)
    tmp = f"{full}.partial-{os.getpid()}"
    try:
        os.makedirs(tmp)
    except OSError as e:
        raise InputError(f"cannot write --out {out}: {e.strerror}") from None
    return tmp


def finish_output(tmp: str, out: str) -> None:
    """Puts the finished folder at --out. An earlier run (--force) is moved aside first, and deleted only
    once the new one is in place."""
    full = os.path.abspath(out)
    old = f"{full}.old-{os.getpid()}" if os.path.exists(full) else None
    try:
        if old:
            os.replace(full, old)
        os.replace(tmp, full)
    except OSError as e:
        if old and not os.path.exists(full):
            os.replace(old, full)
        raise InputError(f"cannot write --out {out}: {e.strerror}") from None
    if old:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def print_table(rows: list[tuple]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for k, row in enumerate(rows):
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def print_results(by_eval: dict, entries: list[dict], forgot: dict, metric: str) -> None:
    names = {"closed_book": "base, closed book", "open_book": "base, open book"}
    conditions = list(next(iter(by_eval.values())))
    counts = {g: sum(e["eval"] == g for e in entries) or len(entries) for g in by_eval}  # "pooled": all of them
    print_table([(metric, "questions", *(names.get(k, f"{k}, closed book") for k in conditions))]
                + [(g, counts[g], *(f"{a[k]:.2f}" for k in conditions)) for g, a in by_eval.items()])
    print()
    print_table([("forgetting", "base", "adapted"),
                 ("retention (general questions)", f"{forgot['retention_base']:.2f}", f"{forgot['retention_adapted']:.2f}"),
                 ("  questions lost", "", forgot["retention_lost"]),
                 ("leakage (document names in answers)", f"{forgot['leakage_base']:.2f}", f"{forgot['leakage_adapted']:.2f}"),
                 ("drift (KL on general prompts)", "0", f"{forgot['drift']:.4f}")])
    print()
    print_table([("stage", "seconds", "peak GiB")] + [(k, f"{s:.0f}", f"{gb:.1f}") for k, (s, gb) in STAGES.items()])


def load_model(args, settings: Settings):
    """(net, prompts): --model, a folder or a GGUF file, or the default model; GGUF files are converted once."""
    path = args.model if args.model is not None else gguf_model.default_model_dir()
    if path.endswith(".gguf"):
        path = gguf_model.gguf_model_dir(path)
    elif not os.path.isdir(path):
        raise InputError(f"--model {args.model} is neither a model folder nor a .gguf file")
    dtype = torch.float32 if settings.precision == "fp32" else None  # None: bfloat16 on a GPU, else float32
    net, tokenizer, chat = m.load(path, device=args.device, dtype=dtype)
    return net, Prompts(tokenizer, chat)


# -----------------------------------------------------------------------------
# The pipeline

def make_pairs(net, prompts: Prompts, passages: list[str], doc_of: list[int], documents: list[str],
               held_out_share: float, settings: Settings, generator) -> tuple[list, int]:
    """(passage index, question, sentence, answer ids) pairs, the held-out ones first, and their number;
    passage p is of documents[doc_of[p]]. A pair is kept only if its answer states a fact of its document
    that its question does not."""
    words = [fact_words(d) for d in documents]

    def answered(asked: list[tuple[int, str, str]], stage: str) -> list[tuple[int, str, str, list[int]]]:
        answers = teacher_answers(net, prompts, passages, [(p, q) for p, q, _ in asked], settings, stage)
        checked = [checked_answer(q, s, a, words[doc_of[p]], prompts) for (p, q, s), a in zip(asked, answers)]
        return [(p, q, s, a) for (p, q, s), a in zip(asked, checked) if a is not None]

    pairs = answered(write_questions(net, prompts, passages, settings, generator), "answers")
    if len(pairs) < 4:
        raise InputError(f"the model wrote only {len(pairs)} usable questions about the document; is it prose?")
    random.Random(settings.seed).shuffle(pairs)
    held_out = math.ceil(held_out_share * len(pairs))
    if settings.blanks:  # trained on, never held out
        pairs += answered(blanked_questions(passages, doc_of, documents), "blanks")
    return pairs, held_out


def guard_examples(net, prompts: Prompts, general_prompts: list[str], settings: Settings) -> list[Example]:
    """General prompts, the base model's own answers to them as the targets: it is their teacher."""
    ids = [prompts.student(p) for p in general_prompts]
    progress = Progress("guard", len(ids), "prompts")
    answers = generate_batched(net, ids, settings.max_answer_tokens, prompts.chat.stop_ids,
                               settings.generation_batch, progress)
    progress.close()
    return [Example([], p, p, a) for p, a in zip(ids, answers)]


def run(args, settings: Settings, documents: list[tuple[str, str]], earlier: list[tuple[str, str]],
        earlier_pairs: list, given_pairs: list | None, eval_items: list[dict] | None, tmp: str) -> dict:
    """
    The whole method on the documents, (path, text) each; writes the adapter, qa.jsonl and report.json
    into tmp. Growing (--adapter with --doc), the earlier documents come first and their pairs, the earlier
    run's qa.jsonl, are replayed; with --pairs the pairs are read, not written anew.
    """
    net, prompts = load_model(args, settings)
    linear = {name.rpartition(".")[2] for name, mod in net.named_modules() if isinstance(mod, torch.nn.Linear)}
    if unknown := sorted(set(settings.targets) - linear):
        raise InputError(f"--targets: the model has no linear layer named {' '.join(unknown)} "
                         f"(it has {' '.join(sorted(linear))})")
    settings.lr = settings.lr or lr_for(net)
    print("settings: " + ", ".join(f"{k} {v}" for k, v in asdict(settings).items()), file=sys.stderr)
    torch.manual_seed(settings.seed)
    # on the model's device: torch.multinomial refuses a CPU generator for CUDA probabilities
    generator = torch.Generator(net.model.embed_tokens.weight.device).manual_seed(settings.seed)
    everything = earlier + documents
    texts = [text for _, text in everything]
    passages, doc_of = [], []  # every document's passages, in order; doc_of[p]: the index of p's document
    for d, text in enumerate(texts):
        pieces = document_passages(text, prompts, net, settings.passage_tokens)
        passages += pieces
        doc_of += [d] * len(pieces)
    first = doc_of.index(len(earlier))  # the first passage of the new documents
    keys = [digest(p)[:16] for p in passages]  # qa.jsonl's passage_sha256: how a pair finds its passage again
    print(f"{len(documents)} document(s), {sum(len(t.split()) for _, t in documents)} words in "
          f"{len(passages) - first} passage(s)" + (f"; {len(earlier)} earlier document(s) replayed" if earlier else "")
          + f"; {sum(p.numel() for p in net.parameters()) / 1e6:.0f}M parameters", file=sys.stderr)

    if given_pairs is not None:
        pairs, held_out = pairs_in(given_pairs, args.pairs, keys, prompts)
    else:
        pairs, held_out = make_pairs(net, prompts, passages[first:], doc_of[first:], texts,
                                     0 if eval_items else settings.holdout, settings, generator)
        pairs = [(p + first, q, s, a) for p, q, s, a in pairs]
    replayed, replay_held = (pairs_in(earlier_pairs, os.path.join(args.adapter, "qa.jsonl"), keys, prompts)
                             if earlier else ([], 0))
    examples, replay = ([Example(*prompts.teacher(passages[p], q), prompts.student(q), a) for p, q, _, a in rows]
                        for rows in (pairs[held_out:], replayed[replay_held:] if settings.replay_batch else []))
    _, guard_prompts, _ = load_general(settings.seed)
    guard = guard_examples(net, prompts, guard_prompts, settings) if settings.guard else []
    asked = [q for _, q, _, _ in pairs[held_out:] + replayed[replay_held:] if not q.startswith(BLANKS)]
    weights = form_weights(guard_prompts, asked, "\n\n".join(texts))

    if earlier:  # the adapter goes on from where it was, in its own shape
        config = lora.load_adapter(net, args.adapter)
        settings.rank, settings.alpha, settings.targets = config["r"], config["lora_alpha"], tuple(config["target_modules"])
    else:
        lora.inject_lora(net, settings.rank, settings.alpha, targets=settings.targets)
    with frozen_weights_in_bf16(net, settings):
        losses = train(net, examples, guard, weights, settings, replay)

    name = "sft" if settings.method == "sft" else "distilled"
    if eval_items is None:  # no gold answers: agreement with the teacher's answers to held-out questions
        eval_items = [{"eval": "held-out questions", "question": q, "answers": [prompts.decode(a)]}
                      for _, q, _, a in pairs[:held_out]]
    open_book = [p for text in texts for p in document_passages(text, prompts, net, OPEN_BOOK_TOKENS)]
    entries, by_eval = evaluate(net, prompts, eval_items, open_book, name, settings, by_f1=args.eval is None)
    forgot = forgetting(net, prompts, texts, settings)

    lora.save_adapter(net, tmp, model_name(args))
    with open(os.path.join(tmp, "qa.jsonl"), "w", encoding="utf-8") as f:  # the new pairs, then the replayed
        for i, (p, q, s, a) in enumerate(pairs + replayed):
            held = i < held_out or len(pairs) <= i < len(pairs) + replay_held
            f.write(json.dumps({"doc": os.path.abspath(everything[doc_of[p]][0]), "passage": p - doc_of.index(doc_of[p]),
                                "passage_sha256": keys[p], "sentence": s, "question": q,
                                "answer": prompts.decode(a), "answer_ids": a, "held_out": held},
                               ensure_ascii=False) + "\n")
    epoch = len(losses) // settings.epochs
    report = {
        "documents": [{"path": os.path.abspath(path), "sha256": digest(text), "passages": doc_of.count(d),
                       "pairs": sum(doc_of[p] == d for p, *_ in pairs + replayed)}
                      for d, (path, text) in enumerate(everything)],
        "grown_from": args.adapter and os.path.abspath(args.adapter), "pairs_from": args.pairs,
        "model": model_name(args), "settings": asdict(settings),
        "passages": len(passages), "qa_pairs": len(pairs), "replayed_pairs": len(replay), "train_examples": len(examples),
        "guard_prompts": len(guard),  # and the 20 most drawn, by the weight of the document's forms:
        "guard_forms": dict(sorted(((g, w) for g, w in zip(guard_prompts, weights) if w), key=lambda x: -x[1])[:20]),
        "metric": "token F1 against the teacher's answer" if args.eval is None else "accuracy (gold answer contained)",
        "open_book": "the whole document" if len(open_book) == 1 else
                     "retrieval: the passage that best matches the question (the paper's RAG baseline)",
        "accuracy": list(by_eval.values())[-1], "accuracy_by_eval": by_eval,  # the last: pooled, or the only one
        "forgetting": {k: v for k, v in forgot.items() if k != "answers"},
        "loss_first_epoch": sum(losses[:epoch]) / epoch, "loss_last_epoch": sum(losses[-epoch:]) / epoch,
        "seconds": {k: s for k, (s, _) in STAGES.items()}, "peak_memory_gb": {k: gb for k, (_, gb) in STAGES.items()},
        "eval": entries, "general_answers": forgot["answers"]}
    write_json(os.path.join(tmp, "report.json"), report)
    print(f"\n{len(entries)} questions, {len(examples)} training pairs"
          + (f" and {len(replay)} replayed" if replay else "") + f", seed {settings.seed}")
    print_results(by_eval, entries, forgot, "F1 vs teacher" if args.eval is None else "accuracy")
    return report


def use_adapter(args, settings: Settings, items: list[dict] | None, documents: list[tuple[str, str]],
                tmp: str | None) -> None:
    """--ask: one question, closed book. --eval: the adapter scored, open book on the documents it learned,
    and with --out a report.json."""
    net, prompts = load_model(args, settings)
    if args.adapter is not None:
        lora.load_adapter(net, args.adapter)
    if args.ask is not None:
        print(prompts.decode(closed_book(net, prompts, [args.ask], settings, "answer")[0]))
        return
    texts = [text for _, text in documents]
    open_book = [p for text in texts for p in document_passages(text, prompts, net, OPEN_BOOK_TOKENS)]
    entries, by_eval = evaluate(net, prompts, items, open_book, "adapter", settings)
    forgot = forgetting(net, prompts, texts, settings)
    print_results(by_eval, entries, forgot, "accuracy")
    if tmp:
        write_json(os.path.join(tmp, "report.json"), {
            "adapter": os.path.abspath(args.adapter), "documents": [os.path.abspath(path) for path, _ in documents],
            "model": model_name(args), "metric": "accuracy (gold answer contained)",
            "accuracy": list(by_eval.values())[-1], "accuracy_by_eval": by_eval,
            "forgetting": {k: v for k, v in forgot.items() if k != "answers"},
            "eval": entries, "general_answers": forgot["answers"]})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_settings(s: Settings) -> None:
    """Refuses, before any model loads, a setting that would fail or do nothing minutes later."""
    for name, low in {"questions_per_passage": 1, "rank": 1, "epochs": 1, "batch_size": 1, "generation_batch": 1,
                      "passage_tokens": 16, "guard_batch": int(s.guard), "replay_batch": 0}.items():
        if getattr(s, name) < low:
            also = " (--no-guard trains without the guard)" if name == "guard_batch" else ""
            raise InputError(f"{flag(name)} must be at least {low}{also}")
    for name in ("alpha", "lr", "temperature") if s.lr is not None else ("alpha", "temperature"):
        if not 0 < getattr(s, name) < math.inf:  # written so that nan is refused too
            raise InputError(f"{flag(name)} must be a number above 0")
    for name in ("guard_weight", "question_temperature"):
        if not 0 <= getattr(s, name) < math.inf:
            raise InputError(f"{flag(name)} must be a number of at least 0")
    if not 0 <= s.form_share <= 1:
        raise InputError("--form-share is a share of the guard's rows, from 0 to 1")


def main() -> int:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0],
                                     epilog="Why each default is what it is: MEASUREMENTS.md.")
    parser.add_argument("--doc", nargs="+", metavar="PATH",
                        help="the documents to inject, UTF-8 text: files, and folders, whose .txt and .md files "
                             "are read recursively in sorted order, hidden ones left out")
    parser.add_argument("--eval", nargs="+", metavar="QA.jsonl",
                        help="JSONL files of {question, answers} to score on, one row each and a pooled row "
                             "(default: held-out generated questions)")
    parser.add_argument("--pairs", metavar="QA.jsonl",
                        help="an earlier run's qa.jsonl: train on its pairs, not new ones (--doc still needed)")
    parser.add_argument("--out", help="output folder (default: runs/<name of the first --doc>)")
    parser.add_argument("--force", action="store_true", help="replace an earlier run in --out")
    parser.add_argument("--model", help="a Hugging Face-style folder or a GGUF file of a llama, qwen2 or qwen3 "
                                         "model (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when present)")
    parser.add_argument("--adapter", help="a trained adapter: with --doc, it learns those documents too, replaying "
                                           "its earlier pairs; else it is scored (--eval) or asked (--ask)")
    parser.add_argument("--ask", help="answer this question closed book (with --adapter, or by the base model)")
    parser.add_argument("--method", choices=["distill", "sft"], default=defaults.method,
                        help="sft: the baseline, cross-entropy on the teacher's answers (default: distill)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=defaults.precision,
                        help="bf16: train under bfloat16 autocast (auto: where the CPU has bf16 units); "
                             "fp32: float32 throughout, on a GPU too")
    parser.add_argument("--no-guard", dest="guard", action="store_false", help="train without the forgetting guard")
    parser.add_argument("--no-blanks", dest="blanks", action="store_false",
                        help="do not ask for each name and number of the document, blanked out")
    parser.add_argument("--targets", nargs="+", default=list(defaults.targets), metavar="NAME",
                        help="the linear layers that get an adapter (default: the seven projections; "
                             "add lm_head as the paper does)")
    for name in ("questions_per_passage", "passage_tokens", "rank", "alpha", "lr", "epochs", "batch_size",
                 "temperature", "guard_weight", "guard_batch", "form_share", "replay_batch",
                 "question_temperature", "generation_batch", "seed"):
        default = getattr(defaults, name)
        parser.add_argument(flag(name), type=float if name == "lr" else type(default), default=default,
                            help=f"default: {default if default is not None else 'from the model size'}",
                            metavar="N" if isinstance(default, int) else "X")
    args = parser.parse_args()
    settings = Settings(**{k: getattr(args, k) for k in asdict(defaults) if hasattr(args, k)})
    settings.targets = tuple(settings.targets)
    tmp = None
    try:
        for name in ("doc", "eval", "pairs", "out", "model", "adapter", "ask"):  # "": an unset shell variable, say
            value = getattr(args, name)
            if value is not None and not all(v.strip() for v in (value if isinstance(value, list) else [value])):
                raise InputError(f"--{name} is empty")
        check_settings(settings)
        training = args.ask is None and (args.adapter is None or args.doc is not None)
        if args.ask is not None and (args.eval, args.doc, args.out, args.pairs) != (None, None, None, None):
            raise InputError("--ask answers one question closed book; it takes no --doc, --eval, --pairs or --out")
        if not training and args.ask is None and args.eval is None:
            raise InputError("--adapter needs one of --eval QA.jsonl, --ask QUESTION and --doc (to learn more)")
        if args.adapter is not None and not os.path.isfile(os.path.join(args.adapter, lora.CONFIG_NAME)):
            raise InputError(f"no adapter in {args.adapter} ({lora.CONFIG_NAME} missing)")
        if training and args.doc is None:
            raise InputError("--doc is required (the documents to inject)")
        # Every input is read, and --out readied, before the model loads.
        documents = [(path, read_document(path)) for path in document_files(args.doc or [])]
        earlier, earlier_pairs = [], []
        if args.adapter is not None:  # its documents: to grow from, or for open book when it is scored
            earlier = earlier_documents(args.adapter, model_name(args) if training else None)
        if training and args.adapter is not None:
            if not earlier:
                raise InputError(f"--adapter {args.adapter} has no report.json listing its documents, which growing needs")
            learned = {digest(text) for _, text in earlier}
            if known := [path for path, text in documents if digest(text) in learned]:
                raise InputError(f"{known[0]} is already learned by --adapter {args.adapter}; give only new documents")
            earlier_pairs = read_pairs(os.path.join(args.adapter, "qa.jsonl"))
        given_pairs = read_pairs(args.pairs) if args.pairs is not None else None
        items = [x for path in args.eval for x in read_eval_file(path)] if args.eval is not None else None
        if given_pairs is not None and items is None and not any(p["held_out"] for _, p in given_pairs):
            raise InputError(f"{args.pairs} holds no held-out pairs to score on; give --eval")
        out = args.out
        if training and out is None:
            out = os.path.join("runs", os.path.splitext(os.path.basename(os.path.normpath(args.doc[0])))[0])
        tmp = start_output(out, args.force) if out is not None else None
        if training:
            run(args, settings, documents, earlier, earlier_pairs, given_pairs, items, tmp)
        else:
            use_adapter(args, settings, items, earlier, tmp)
        if tmp:
            finish_output(tmp, out)
            print(f"\nwritten to {out}")
        return 0
    except (InputError, m.ModelError, ValueError, OSError) as e:  # OSError: an unreadable file, a full disk
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nerror: interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)  # renamed away already, unless the run failed


if __name__ == "__main__":
    sys.exit(main())
