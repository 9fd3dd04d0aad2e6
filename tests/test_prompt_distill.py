"""The pipeline's pieces: the loss, token alignment, parsing, the forgetting measures, bad input."""

import itertools
import json
import math
import os
import random
import re
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import lora
import model as m
import prompt_distill as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "data", "lake_town.txt")
QA = os.path.join(ROOT, "data", "lake_town.qa.jsonl")


# The loss

def test_distillation_loss_is_zero_when_distributions_match():
    logits = torch.randn(5, 11)
    for temperature in (0.5, 1.0, 2.0):
        assert pd.distillation_loss(logits, logits.clone(), temperature).abs().item() < 1e-6


def test_distillation_loss_matches_a_hand_computation():
    teacher, student = [0.7, 0.2, 0.1], [0.5, 0.3, 0.2]
    by_hand = sum(t * math.log(t / s) for t, s in zip(teacher, student))  # KL(teacher || student)
    loss = pd.distillation_loss(torch.tensor([student]).log(), torch.tensor([teacher]).log(), 1.0)
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)


def test_temperature_softens_both_distributions_and_scales_by_its_square():
    teacher, student = torch.randn(4, 9), torch.randn(4, 9)
    T = 2.0
    p, q = F.softmax(teacher / T, -1), F.softmax(student / T, -1)
    expected = (p * (p.log() - q.log())).sum(-1).mean() * T**2
    assert pd.distillation_loss(student, teacher, T).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_gradient_points_the_student_towards_the_teacher(T):
    teacher = torch.randn(3, 7)
    student = torch.randn(3, 7, requires_grad=True)
    pd.distillation_loss(student, teacher, T).backward()
    expected = T * (F.softmax(student.detach() / T, -1) - F.softmax(teacher / T, -1)) / 3
    assert torch.allclose(student.grad, expected, atol=1e-6)
    stepped = student.detach() - 0.1 * student.grad  # a small step down the gradient brings them closer
    assert pd.distillation_loss(stepped, teacher, T) < pd.distillation_loss(student.detach(), teacher, T)


# Token alignment between teacher and student

def test_teacher_and_student_are_scored_on_exactly_the_answer_tokens(tiny_llama):
    path, _ = tiny_llama
    _, tokenizer, chat = m.load(path)
    prompts = pd.Prompts(tokenizer, chat)
    passage, question = "the town of lake was founded in 1 by the mayor", "who was the mayor ?"
    answer = prompts.encode("the mayor was a") + [chat.stop_ids[0]]
    prefix, suffix = prompts.open_book(passage, question)
    student = prompts.closed_book(question)
    assert prompts.encode(passage) == prefix[-len(prompts.encode(passage)):]  # the teacher sees the passage
    assert not set(prompts.encode("founded 1")) & set(student + suffix)  # the student and the suffix do not

    for (prefix_len, prompt), multiple in itertools.product(((len(prefix), suffix), (0, student)), (1, 16)):
        ids, mask, select = pd.pack([prompt, prompt[:3]], [answer, answer[:2]], prefix_len, multiple)
        assert ids.shape[1] % multiple == 0 and ids.shape[1] - (len(prompt) + len(answer)) < multiple
        predicted = ids.roll(-1, dims=1)[select]  # the token each selected position predicts
        assert predicted.tolist() == answer + answer[:2]
        assert mask.sum().item() == 2 * prefix_len + len(prompt) + len(answer) + 3 + 2


def test_prefix_and_suffix_make_the_whole_prompt(default_model):
    _, tokenizer, chat = default_model
    prompts = pd.Prompts(tokenizer, chat)
    passage = "Velmora was founded in 1847.\nIts mayor is Harriet Quell."
    prefix, suffix = prompts.with_passage(passage, pd.ANSWER_INSTRUCTION.format(q="Who is the mayor of Velmora?"))
    whole = chat.render([{"role": "user", "content": passage + "\n\n" +
                          pd.ANSWER_INSTRUCTION.format(q="Who is the mayor of Velmora?")}])
    assert prefix + suffix == prompts.encode(whole)  # the split falls on a token boundary


def test_answer_logits_with_a_shared_prefix_equal_the_full_forward(tiny_llama):
    path, _ = tiny_llama
    net, _, _ = m.load(path)
    prefix, prompts, answers = [5, 6, 7, 8], [[9, 10], [11, 12, 13]], [[14, 15, 2], [16, 2]]
    shared = pd.answer_logits(net, prompts, answers, m.prefill(net, prefix))
    full = pd.answer_logits(net, [prefix + p for p in prompts], answers)
    assert torch.allclose(shared, full, atol=1e-5)


def test_the_shared_start_of_the_student_prompts_changes_no_loss_and_no_gradient(tiny_llama):
    """batch_loss runs what every student prompt starts with once, as a prefix: gradients flow through it."""
    path, _ = tiny_llama
    net, _, _ = m.load(path)
    lora.inject_lora(net, r=4, alpha=4)
    torch.manual_seed(0)
    for p in lora.lora_parameters(net):  # a trained adapter: the prefix's keys and values depend on it
        p.data.normal_(0, 0.2)
    batch = [pd.Example([3], [4, 5], [5, 6, 7, 9, 10], [14, 15, 2]), pd.Example([3], [8], [5, 6, 7, 11], [16, 2])]
    guard = [pd.Example([], [5, 6, 12], [5, 6, 12], [17, 2])]
    assert pd.common_start([e.student for e in batch + guard]) == [5, 6]
    pd.compute_targets(net, batch + guard, pd.Settings())

    def loss_and_gradients(loss_fn):
        net.zero_grad()
        loss, on_guard = loss_fn()
        (loss + on_guard).backward()
        return loss.item(), on_guard.item(), [p.grad.clone() for p in lora.lora_parameters(net)]

    def without_a_prefix():
        student = pd.answer_logits(net, [e.student for e in batch + guard], [e.answer for e in batch + guard])
        return (pd.distillation_loss(student[:5], pd.target_logits(net, batch), 1.0),
                pd.distillation_loss(student[5:], pd.target_logits(net, guard), 1.0))

    shared = loss_and_gradients(lambda: pd.batch_loss(net, batch, guard, pd.Settings()))
    full = loss_and_gradients(without_a_prefix)
    assert shared[0] == pytest.approx(full[0], rel=1e-4) and shared[1] == pytest.approx(full[1], rel=1e-4)
    assert full[0] > 0.01 and all(g.abs().sum() > 0 for g in full[2])
    for a, b in zip(shared[2], full[2]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_bf16_autocast_training_sees_every_optimizer_step(tiny_llama):
    """Autocast may keep its bf16 copy of a trainable weight for the whole block; the LoRA must not go stale."""
    path, _ = tiny_llama
    net, _, _ = m.load(path)
    lora.inject_lora(net, r=4, alpha=4)
    optimizer = torch.optim.SGD(lora.lora_parameters(net), lr=1.0)
    ids = torch.tensor([[3, 4, 5, 6]])
    with pd.precision(net, pd.Settings(precision="bf16")):
        for step in range(2):
            logits = net(ids)
            assert logits.dtype == torch.bfloat16  # autocast is on
            if step == 0:
                before = logits.detach().float()
                logits.float().pow(2).mean().backward()
                optimizer.step()
    assert not torch.allclose(before, logits.detach().float())


@pytest.mark.parametrize("lm_head_adapted", [False, True])
def test_frozen_weights_in_bf16_train_exactly_as_autocast_does_and_come_back(tiny_llama, lm_head_adapted):
    """Autocast would cast the frozen weights at every use; cast once, they must give the same numbers."""
    path, _ = tiny_llama
    net, _, _ = m.load(path)
    lora.inject_lora(net, r=4, alpha=4, targets=lora.DEFAULT_TARGETS + (("lm_head",) if lm_head_adapted else ()))
    perturb(net)
    batch = [pd.Example([3], [4, 11], [5, 9], [6, 7, 2]), pd.Example([3], [12], [5, 6], [8, 2])]
    guard = [pd.Example([], [5, 13, 14], [5, 13, 14], [6, 7, 2])]
    settings = pd.Settings(precision="bf16")
    parameters = dict(net.named_parameters())
    unchanged = lambda: {n: id(p) for n, p in net.named_parameters()} == {n: id(p) for n, p in parameters.items()}

    def targets_and_step():
        pd.compute_targets(net, batch + guard, settings)
        net.zero_grad()
        losses = pd.backward_step(net, batch, guard, settings)
        return [e.target.clone() for e in batch + guard], losses, [p.grad.clone() for p in lora.lora_parameters(net)]

    plain = targets_and_step()
    with pd.frozen_weights_in_bf16(net, settings):
        frozen = [mod.weight for mod in net.modules() if isinstance(mod, torch.nn.Linear) and not mod.weight.requires_grad]
        assert len(frozen) == 2 * 7 + 1 and all(w.dtype == torch.bfloat16 for w in frozen)
        assert net.model.embed_tokens.weight.dtype == torch.float32
        assert all(p.dtype == torch.float32 for p in lora.lora_parameters(net))
        cast = targets_and_step()
    assert plain[1] == cast[1] and plain[1][0] > 0.01
    for a, b in itertools.chain(zip(plain[0], cast[0]), zip(plain[2], cast[2])):
        assert torch.equal(a, b)

    with pytest.raises(KeyboardInterrupt), pd.frozen_weights_in_bf16(net, settings):
        raise KeyboardInterrupt  # Ctrl-C in training: the float32 weights come back all the same
    assert unchanged()  # the same Parameters, not copies
    head = net.lm_head.base_layer if lm_head_adapted else net.lm_head
    assert head.weight is net.model.embed_tokens.weight  # tied again
    with pd.frozen_weights_in_bf16(net, pd.Settings(precision="fp32")):  # no autocast: nothing to cast
        assert unchanged()


def test_the_kernel_caches_are_capped_unless_the_user_set_their_size(monkeypatch):
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "512")
    pd.limit_kernel_caches()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(pd.KERNEL_CACHE_CAPACITY)
    assert os.environ["LRU_CACHE_CAPACITY"] == "512"


# Questions and documents

def test_generation_batches_are_even_and_their_kv_cache_fits_the_budget(tiny_llama, monkeypatch):
    path, _ = tiny_llama
    net, _, _ = m.load(path)
    prompts = [[5 + i % 7, 6, 7 + i % 3] for i in range(77)]
    one_by_one = [m.generate(net, [p], 4, ())[0] for p in prompts]
    sizes, generate = [], m.generate

    def counted(net, rows, *args, **kwargs):
        sizes.append(len(rows))
        return generate(net, rows, *args, **kwargs)

    monkeypatch.setattr(m, "generate", counted)
    assert pd.generate_batched(net, prompts, 4, (), 32) == one_by_one  # greedy rows do not depend on their batch
    assert sizes == [25, 26, 26]
    one_token = m.KVCache(net.config, 1, 1, "cpu", torch.float32)  # measured, not the formula again
    bytes_per_token = sum(t.numel() * t.element_size() for t in one_token.k + one_token.v)
    sizes.clear()
    monkeypatch.setattr(pd, "GENERATION_KV_BYTES", 10 * (100 + 3 + 4) * bytes_per_token)  # 10 rows of this prefix
    pd.generate_batched(net, prompts, 4, (), 32, prefix=[5 + i % 20 for i in range(100)])
    assert max(sizes) <= 10 and sum(sizes) == 77 and max(sizes) - min(sizes) <= 1
    assert pd.generate_batched(net, [], 4, (), 32) == []


def test_parse_questions_strips_numbering_and_drops_non_questions():
    text = ("1. Who founded the town of Velmora?\n2) In what year was the Velmora bridge built?\n"
            "Here are some questions:\n- What does the text say about the mayor?\nWhy?\n"
            "* How many people live in Velmora?")
    assert pd.parse_questions(text) == ["Who founded the town of Velmora?",
                                        "In what year was the Velmora bridge built?",
                                        "How many people live in Velmora?"]


def test_near_duplicates_are_recognised():
    a = pd.word_set("Who founded the town of Velmora?")
    b = pd.word_set("Who founded the town of Velmora")
    c = pd.word_set("When was the Velmora bridge built?")
    assert pd.near_duplicate(a, b) and not pd.near_duplicate(a, c)


def test_long_document_is_split_into_passages_that_fit():
    paragraph = " ".join(f"Sentence {i} says the mill turned {i} times." for i in range(40))
    text = "\n\n".join([paragraph] * 30)  # about 50 pages' worth of words would take long; this is 12k words
    count = lambda s: len(s.split())
    passages = pd.split_passages(text, count, 200)
    assert all(count(p) <= 200 for p in passages)
    assert " ".join(" ".join(passages).split()) == " ".join(text.split())  # nothing lost, nothing repeated


def test_one_huge_sentence_is_cut_by_words():
    text = " ".join(["word"] * 1000)
    passages = pd.split_passages(text, lambda s: len(s.split()), 64)
    assert all(len(p.split()) <= 64 for p in passages) and sum(len(p.split()) for p in passages) == 1000


def test_one_huge_word_is_cut_by_characters():
    blob = "QmFzZTY0" * 500  # 4,000 characters and no space, as a pasted URL or base64 blob
    count = lambda s: -(-len(s) // 4)  # a token per 4 characters
    passages = pd.split_passages(f"See {blob} here.", count, 64)
    assert all(count(p) <= 64 for p in passages) and "".join("".join(passages).split()) == f"See{blob}here."


def test_a_dense_word_before_short_ones_does_not_push_a_cut_past_the_budget():
    text = "x" * 60 + " y" * 60  # a token per character: the first word holds half the sentence's tokens
    passages = pd.split_passages(text, len, 100)
    assert max(map(len, passages)) <= 100 and " ".join(passages).split() == text.split()


def test_is_correct_needs_the_normalised_gold_inside_the_answer():
    assert pd.is_correct("The mayor is Harriet Quell.", ["harriet quell"])
    assert not pd.is_correct("The mayor is Harriet.", ["Harriet Quell"])
    assert pd.is_correct("It was founded in 1,847? No: 1847.", ["1847"])
    assert pd.is_correct("She borrowed 9000 crowns.", ["9,000 crowns"])


def test_is_correct_matches_whole_words_only():
    # wrong answers that a substring match took for right ones (the adapted model's, in the retention set)
    assert not pd.is_correct("There are 120 months in a year.", ["twelve", "12"])
    assert not pd.is_correct("There are 2400 minutes in a day.", ["24"])
    assert not pd.is_correct("The twin village is Fendlestrandholm.", ["Fendlestrand"])
    # a mark inside a word still separates it
    assert pd.is_correct("A day is a 24-hour period.", ["24"])
    assert pd.is_correct("Water boils at approximately 100.0 degrees Celsius.", ["100"])
    assert pd.is_correct("It was minus 61 degrees.", ["-61"])
    assert not pd.is_correct("It was -261.6°C.", ["-61"])
    # a decimal is one number: its parts are not the gold (an adapter's "-61.8 degrees" for minus 61)
    assert not pd.is_correct("It was -61.8 degrees.", ["-61"])
    assert not pd.is_correct("The lake is 1.5 km long.", ["5"])
    assert not pd.is_correct("About 12.5 metres.", ["12"])
    assert pd.is_correct("The lake is 1.5 km long.", ["1.5 km"])
    assert pd.is_correct("It has 12 rooms.", ["12"])


def test_a_pair_states_an_answer_only_when_its_question_does_not_hand_it_over():
    golds = [["Odessa Marchbank"], ["1782"], ["Patient Gull"]]
    pairs = [("Who is the mayor?", "The mayor is Odessa Marchbank."),
             ("Is Odessa Marchbank the mayor?", "Odessa Marchbank is the mayor."),  # the question holds it
             ("When was the town founded?", "It was founded in 1782."),
             ("Who leads the town?", "Odessa Marchbank leads it.")]
    assert pd.pairs_stating(golds, pairs) == [2, 1, 0]
    opened, adapted = ["Odessa Marchbank", "in 1782", "the Patient Gull"], ["Odessa Marchbank", "1790", "no idea"]
    rows = pd.coverage_table([2, 1, 0], golds, opened, adapted, "distilled")
    assert rows[1:] == [("0", 1, 1, 0), ("1-2", 2, 2, 1), ("3-5", 0, 0, 0), ("6 or more", 0, 0, 0)]


# More questions where few pairs state a fact

PASSAGE = "Odessa Marchbank is the mayor of Quillmere. The ferry to Pellow Island runs nine times a day."
MAYOR, FERRY = PASSAGE.split(". ")[0] + ".", PASSAGE.split(". ")[1]


def test_a_pair_teaches_the_fact_words_its_answer_adds_to_its_question():
    words = pd.fact_words(PASSAGE)
    assert {"odessa", "marchbank", "mayor", "ferry", "nine"} <= words and "the" not in words
    assert pd.stated("Who is the mayor of Quillmere?", "Odessa Marchbank.", words) == {"odessa", "marchbank"}
    assert pd.stated("Is Odessa Marchbank the mayor?", "Odessa Marchbank is the mayor.", words) == set()


def test_top_up_asks_again_about_the_sentences_that_few_pairs_state(monkeypatch):
    qa = [(0, f"Who is mayor number {i}?", MAYOR, "Odessa Marchbank.") for i in range(6)]  # 6 state the mayor
    calls = []

    def write_questions(net, prompts, passages, jobs, settings, generator, progress, seen):
        calls.append((list(jobs), len(seen[0])))
        return [(0, f"How often does the ferry run, take {len(calls)}.{i}?", FERRY) for i in range(3)]
    monkeypatch.setattr(pd, "write_questions", write_questions)
    monkeypatch.setattr(pd, "answer_open_book", lambda net, prompts, passages, asked, *a, **k:
                        ["Nine times a day."] * len(asked))
    text = types.SimpleNamespace(decode=lambda answer: answer)  # answers are text here, not ids
    settings = pd.Settings(pairs_per_fact=6, top_up_rounds=3)
    grown = pd.top_up(None, text, [PASSAGE], qa, pd.fact_words(PASSAGE), settings, None)
    # two calls per missing pair: 6 missing, then 3; after the second round the ferry has its 6 pairs
    assert calls == [([(0, FERRY)] * 12, 6), ([(0, FERRY)] * 6, 9)]
    assert grown[:6] == qa and len(grown) == 12 and all(f == FERRY for _, _, f, _ in grown[6:])


def test_blanks_cover_each_name_and_number_but_not_what_the_document_is_about():
    document = ("Odessa Marchbank is the mayor of Quillmere. The ferry to Pellow Island runs 9 times a day. "
                "Quillmere has a lake. Quillmere has a school. Quillmere has a port. It opened in 1901.")
    asked = pd.blanked_questions([document], document)
    assert {q for _, q, _ in asked} == {
        'Fill in the blank: "___ is the mayor of Quillmere."',
        'Fill in the blank: "Odessa Marchbank is the mayor of ___."',
        'Complete the sentence: "Odessa Marchbank is the mayor of ..."',
        'Fill in the blank: "The ferry to ___ runs 9 times a day."',
        'Complete the sentence: "The ferry to ..."',
        'Fill in the blank: "It opened in ___."',
        'Complete the sentence: "It opened in ..."'}
    assert all(p == 0 and sentence in document for p, _, sentence in asked)
    about_quillmere = document + " Quillmere has a bell."  # now in five sentences: what the text is about
    asked = pd.blanked_questions([about_quillmere], about_quillmere)
    assert not any(q.endswith('mayor of ___."') for _, q, _ in asked)
    sentence = "It was led by Dr. Lisabel Harrowmont in 1978."
    assert pd.facts(sentence) == [sentence]  # "Dr." ends no sentence


def test_a_number_that_begins_a_sentence_is_blanked_too():
    document = "1887 saw the first ferry. It was named the Patient Gull."
    assert 'Fill in the blank: "___ saw the first ferry."' in {q for _, q, _ in pd.blanked_questions([document], document)}


# The forgetting measures

def test_leakage_finds_a_planted_name_and_ignores_names_in_the_question():
    document = "The town of Velmora was founded in 1847 by Harriet Quell. The river is called the Ousk."
    terms = pd.distinctive_terms(document)
    assert {"Velmora", "Quell", "1847", "Ousk"} <= terms and "The" not in terms
    assert pd.leaks("Romeo and Juliet was written by Harriet Quell.", "Who wrote Romeo and Juliet?", terms) \
        == ["Harriet", "Quell"]
    assert pd.leaks("Velmora is a town.", "Where is Velmora?", terms) == []
    assert pd.leaks("William Shakespeare wrote it in 1597.", "Who wrote Romeo and Juliet?", terms) == []
    assert pd.leaks("The Nile River is the longest.", "What is the longest river in Africa?", {"River"}) == []
    assert pd.leaks("A year has 365.25 days, or 8,766 hours.", "How long is a year?", {"25", "766", "8"}) == []
    assert pd.leaks("It was 1847. Then 25, then 8.", "When?", {"1847", "25", "8"}) == ["1847", "25", "8"]


def test_leak_terms_drop_names_the_tokenizer_keeps_whole_but_keep_names_of_several_words():
    document = "The Blue Hour of Velmora came on 30 September 1847. It's Harriet Quell's."
    pieces = {"Velmora": 3, "Quell": 2, "Harriet": 2, "It's": 3, "Quell's": 3}  # a fake tokenizer's counts
    terms = pd.leak_terms(document, lambda text: pieces.get(text.strip(), 1))
    assert terms == {"Velmora", "Quell", "Harriet", "1847", "30", "Blue Hour"}
    answer = "The Blue Whale, 30 meters long."
    assert pd.leaks(answer, "What is the largest mammal?", pd.distinctive_terms(document)) == ["30", "Blue"]
    assert pd.leaks(answer, "What is the largest mammal?", terms) == ["30"]
    assert pd.leaks("The Great Blue Hour.", "What is the largest ocean?", terms) == ["Blue Hour"]


def test_superlative_prompts_ask_the_world_for_what_the_document_calls_the_highest_or_the_first():
    document = ("Velmora was founded in 1847. Mount Ystrel, the highest mountain on the plateau, is 4,682 metres. "
                "The oldest rowing boat of the town is kept in its first wooden dock. His most famous photograph "
                "is called Blue Hour. The Highest Court of Velmora sits there.")
    assert pd.superlative_prompts(document) == [
        "What is the highest mountain in the world?", "What is the oldest rowing boat in the world?",
        "What is the first wooden dock in the world?", "What is the most famous photograph in the world?"]
    assert pd.superlative_prompts("The town of Velmora was founded in 1847 by Harriet Quell.") == []


def test_words_that_only_end_like_a_superlative_neither_count_nor_hide_one():
    document = "After the harvest festival is the oldest fair in town. The rest of the day the guest slept."
    assert pd.superlative_prompts(document) == ["What is the oldest fair in the world?"]


def test_leaks_leave_out_what_the_base_model_said_too():
    terms = {"Velmora", "30", "1847"}
    base = "The blue whale, up to 30 meters long."
    assert pd.leaks("The blue whale of Velmora, 30 meters.", "What is the largest mammal?", terms, base) \
        == ["Velmora"]
    assert pd.leaks("It was 30 meters in 1847.", "How long?", terms, base) == ["1847"]


def perturb(net) -> None:
    with torch.no_grad():
        for p in lora.lora_parameters(net):
            p.normal_(0, 0.2)


def test_targets_are_the_adapter_free_teachers_logits_with_the_passage_in_its_prompt(tiny_llama):
    path, _ = tiny_llama
    net, _, _ = m.load(path)
    lora.inject_lora(net, r=4, alpha=4, targets=lora.DEFAULT_TARGETS + ("lm_head",))
    passage = [5, 6, 7, 8]
    examples = [pd.Example(passage, [9, 10], [9], [14, 15, 2]), pd.Example(passage, [11, 12, 13], [11], [16, 2]),
                pd.Example([], [3, 4], [3, 4], [17, 2])]
    with torch.no_grad():
        expected = [pd.answer_logits(net, [e.prefix + e.teacher], [e.answer]) for e in examples]
    perturb(net)  # the adapter, lm_head's included, must not reach the targets
    pd.compute_targets(net, examples, pd.Settings(precision="fp32"))
    for e, logits in zip(examples, expected):
        assert e.target.shape == (len(e.answer), net.config.hidden_size)
        assert torch.allclose(pd.target_logits(net, [e]), logits, atol=1e-5)


def test_guard_targets_come_from_the_base_model_so_a_fresh_adapter_has_zero_guard_loss(tiny_llama):
    path, _ = tiny_llama
    net, _, _ = m.load(path)
    lora.inject_lora(net, r=4, alpha=4)
    batch = [pd.Example([], [3, 4], [5], [6, 2])]
    guard = [pd.Example([], [3, 4, 5], [3, 4, 5], [6, 7, 2]), pd.Example([], [8, 9], [8, 9], [10, 2])]
    pd.compute_targets(net, batch + guard, pd.Settings(precision="fp32"))
    _, on_guard = pd.batch_loss(net, batch, guard, pd.Settings())
    assert on_guard.item() == pytest.approx(0.0, abs=1e-6)
    perturb(net)
    _, on_guard = pd.batch_loss(net, batch, guard, pd.Settings())
    assert on_guard.item() > 1e-4  # a changed adapter is pulled back


def test_answer_margins_are_the_base_models_smallest_until_the_answer_states_the_gold(tiny_llama):
    path, _ = tiny_llama
    net, tokenizer, chat = m.load(path)
    lora.inject_lora(net, r=4, alpha=4)
    perturb(net)  # an adapter that changes the logits, which the margins must not see
    prompts = pd.Prompts(tokenizer, chat)
    answer = prompts.encode("a year is 9")
    # the gold stated by the second token, by the third, and never: the margins of 2, 3 and all 4 tokens
    general_qa = [{"question": "how many year ?", "answers": [gold]} for gold in ("year", "is", "bridge")]
    margins = pd.answer_margins(net, prompts, general_qa, [answer] * 3)
    prompt = prompts.closed_book(general_qa[0]["question"])
    with torch.no_grad(), lora.lora_disabled(net):
        probs = net(torch.tensor([prompt + answer]))[0, len(prompt) - 1: -1].softmax(-1)
    top = probs.topk(2, dim=-1).values
    each = (top[:, 0] - top[:, 1]).tolist()
    for margin, stated in zip(margins, (2, 3, len(answer))):
        assert margin == pytest.approx(min(each[:stated]), abs=1e-5)
    assert each[2] < min(each[:2])  # this random model's margins tell a cut one token off, or none, apart
    assert pd.answer_margins(net, prompts, general_qa[:1], [[]]) == pytest.approx(each[:1], abs=1e-5)


def test_guard_rows_in_the_same_pass_do_not_change_the_document_loss(tiny_llama):
    path, _ = tiny_llama
    net, _, _ = m.load(path)
    lora.inject_lora(net, r=4, alpha=4)
    batch = [pd.Example([], [3, 4, 11], [5], [6, 2]), pd.Example([], [3, 12], [5, 9], [7, 8, 2])]
    guard = [pd.Example([], [3, 4, 5, 13, 14], [3, 4, 5, 13, 14], [6, 7, 2])]
    pd.compute_targets(net, batch + guard, pd.Settings(precision="fp32"))
    perturb(net)
    for method in ("distill", "sft"):
        alone, _ = pd.batch_loss(net, batch, [], pd.Settings(method=method))
        mixed, _ = pd.batch_loss(net, batch, guard, pd.Settings(method=method))
        assert mixed.item() == pytest.approx(alone.item(), rel=1e-5)


@pytest.mark.parametrize("ratio", [1.0, 3.0])
def test_lora_b_learns_at_lr_times_lr_b_ratio(tiny_llama, ratio):
    """
    LoRA+: on the first step B = 0, so A gets no gradient and only weight decay moves it, while Adam moves
    every element of B that has a gradient by its whole learning rate: lr x lr_b_ratio.
    """
    path, _ = tiny_llama
    net, _, _ = m.load(path)
    lora.inject_lora(net, r=4, alpha=4)
    A_before = [A.detach().clone() for A in lora.lora_parameters(net, "A")]
    settings = pd.Settings(precision="fp32", epochs=1, batch_size=1, lr=1e-3, lr_b_ratio=ratio, guard=False)
    pd.train(net, [pd.Example([], [3, 4, 11], [5, 9], [6, 7, 2])], [], [], [], settings)
    steps = torch.cat([B.detach().abs().flatten() for B in lora.lora_parameters(net, "B")])
    assert steps.max().item() == pytest.approx(1e-3 * ratio, rel=1e-3)
    for A, before in zip(lora.lora_parameters(net, "A"), A_before):
        assert torch.allclose(A, before * (1 - 1e-3 * settings.weight_decay))


@pytest.mark.parametrize("method", ["distill", "sft"])
def test_a_step_run_in_parts_has_the_gradients_of_the_whole_step(tiny_llama, method):
    """A step of long rows runs in parts (step_parts) to bound its memory; its gradients must not change."""
    path, _ = tiny_llama
    net, _, _ = m.load(path)
    lora.inject_lora(net, r=4, alpha=4)
    batch = [pd.Example([3], [4, 11], [5, 6, 9, 10, 11, 12], [6, 2]), pd.Example([3], [12], [5, 6, 9], [7, 8, 9, 2]),
             pd.Example([3], [4, 13], [5, 6, 14], [8, 2]), pd.Example([3], [15], [5, 6, 9, 10], [7, 10, 11, 12, 2])]
    guard = [pd.Example([], [5, 6, 13, 14], [5, 6, 13, 14], [6, 7, 2]), pd.Example([], [5, 6, 15], [5, 6, 15], [8, 2])]
    pd.compute_targets(net, batch + guard, pd.Settings(precision="fp32"))
    perturb(net)

    def step(max_tokens):
        net.zero_grad()
        settings = pd.Settings(method=method, precision="fp32", step_tokens=max_tokens, guard_weight=0.5)
        parts = pd.step_parts(batch, guard, max_tokens)
        loss, total = pd.backward_step(net, batch, guard, settings)
        return parts, loss, total, [p.grad.clone() for p in lora.lora_parameters(net)]

    whole, in_parts = step(10**6), step(16)
    assert whole[0] == [(batch, guard)]
    assert [[len(e.student) + len(e.answer) for e in rows + g] for rows, g in in_parts[0]] == [[9], [8, 7], [5, 7], [5]]
    assert sorted(map(id, (e for rows, g in in_parts[0] for e in rows + g))) == sorted(map(id, batch + guard))
    assert in_parts[1] == pytest.approx(whole[1], rel=1e-5) and in_parts[2] == pytest.approx(whole[2], rel=1e-5)
    assert whole[2] > whole[1] > 0.01
    for a, b in zip(whole[3], in_parts[3]):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    assert sum(g.abs().sum() for g in whole[3]) > 0


# Bad input: one line, non-zero exit, nothing written

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "prompt_distill.py"), *args],
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(result, words: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and words in lines[0], result.stderr


@pytest.mark.parametrize("content, words", [
    (None, "document not found"),
    (b"", "is empty"),
    (b"  \n\n \t\n", "is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a text file"),
    ("Caf\u00e9 au lait".encode("latin-1"), "not UTF-8"),
    ("a folder", "is a folder"),
])
def test_bad_document_is_one_line(tmp_path, content, words):
    doc = tmp_path / "doc.txt"
    if content == "a folder":
        doc.mkdir()
    elif content is not None:
        doc.write_bytes(content)
    out = tmp_path / "out"
    assert_one_line_error(run_cli("--doc", str(doc), "--out", str(out), "--model", str(tmp_path)), words)
    assert not out.exists()


@pytest.mark.parametrize("text, words", [
    ('{"question": "Who?", "answers": ["X"]}\n\n{"question": "What?"}\n'.encode(), "line 3: expected"),
    ('{"question": "Who?", "answers": ["X"]}\n{"question": "Caf\u00e9?", "answers": ["X"]}\n'.encode("latin-1"),
     "line 2: not UTF-8"),
    (b'["Who?", ["X"]]\n', "line 1: expected"),
    (b'{"question": "Who?", "answers": "X"}\n', "line 1: expected"),
])
def test_malformed_eval_line_is_named(tmp_path, text, words):
    qa = tmp_path / "qa.jsonl"
    qa.write_bytes(text)
    assert_one_line_error(run_cli("--doc", DOC, "--eval", str(qa), "--out", str(tmp_path / "o")), words)


def test_an_eval_file_that_starts_with_a_byte_order_mark_is_read(tmp_path):
    with_bom = tmp_path / "qa.jsonl"
    with open(QA, "rb") as f:
        with_bom.write_bytes(b"\xef\xbb\xbf" + f.read())  # as Windows' Notepad saves UTF-8
    assert pd.read_eval_file(str(with_bom)) == pd.read_eval_file(QA)


def test_an_out_folder_that_cannot_be_made_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    result = run_cli("--doc", DOC, "--out", str(blocker / "out"), "--model", str(tmp_path / "no model"))
    assert_one_line_error(result, "cannot make the folder for --out")


@pytest.mark.parametrize("flags", [[], ["--ask", "Who?", "--eval", "qa.jsonl"]])
def test_adapter_needs_one_of_eval_and_ask(tmp_path, flags):
    assert_one_line_error(run_cli("--adapter", str(tmp_path), *flags), "needs one of --eval QA.jsonl and --ask")


@pytest.mark.parametrize("flags, words", [
    (["--adapter", "runs/x", "--ask", "Who?", "--doc", DOC], "--doc goes with --eval"),
    (["--doc", DOC, "--ask", "Who?"], "--ask needs --adapter"),
])
def test_ask_is_refused_where_it_would_be_ignored(flags, words):
    assert_one_line_error(run_cli(*flags), words)


@pytest.mark.parametrize("adapter_files, eval_text, words", [
    ({}, '{"question": "Who?", "answers": ["X"]}\n', "no adapter in"),
    ({"adapter_config.json": "{}"}, '{"question": "Who?"}\n', "line 1"),
])
def test_adapter_evaluation_refuses_bad_input_before_the_model_loads(tmp_path, adapter_files, eval_text, words):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name, text in adapter_files.items():
        (adapter / name).write_text(text)
    qa = tmp_path / "qa.jsonl"
    qa.write_text(eval_text)
    result = run_cli("--adapter", str(adapter), "--eval", str(qa), "--model", str(tmp_path / "no model"))
    assert_one_line_error(result, words)  # not the missing model's error: the input is read first


@pytest.mark.parametrize("flags, words", [
    (["--lr", "0"], "--lr must be a number above 0"),
    (["--lr", "nan"], "--lr must be a number above 0"),
    (["--lr-b-ratio", "-1"], "--lr-b-ratio must be a number above 0"),
    (["--temperature", "inf"], "--temperature must be a number above 0"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--rank", "0"], "--rank must be at least 1"),
    (["--guard-batch", "0"], "--no-guard trains without the guard"),
    (["--superlative-share", "1.5"], "--year-share"),
    (["--superlative-share", "0.5", "--year-share", "0.6"], "together at most 1"),
    (["--top-up-rounds", "2", "--pairs-per-fact", "0"], "it would do nothing"),
])
def test_a_setting_out_of_its_range_is_refused_before_any_work(tmp_path, flags, words):
    result = run_cli("--doc", DOC, "--out", str(tmp_path / "o"), "--model", str(tmp_path / "no model"), *flags)
    assert_one_line_error(result, words)  # the settings' error, not the missing model's: they come first
    assert not (tmp_path / "o").exists()


def test_guard_batch_zero_is_refused_only_with_the_guard_on():
    pd.check_settings(pd.Settings(guard=False, guard_batch=0))
    with pytest.raises(pd.InputError):
        pd.check_settings(pd.Settings(guard_batch=0))


def test_help_gives_each_numeric_settings_default_next_to_its_flag():
    out = run_cli("--help").stdout
    defaults = pd.Settings()
    for name in ("questions_per_passage", "lr", "epochs", "batch_size", "guard_weight", "superlative_share", "seed"):
        value = getattr(defaults, name)
        assert re.search(rf"{pd.flag(name)} [A-Z]+\s+default: {re.escape(str(value))}\n", out), name
    assert "default: True" not in out and "default: None" not in out  # --no-guard and --out said so before


def test_a_target_the_model_does_not_have_is_refused_before_any_work(tiny_llama, tmp_path):
    result = run_cli("--doc", DOC, "--model", tiny_llama[0], "--out", str(tmp_path / "o"),
                     "--targets", "q_proj", "qproj")
    assert_one_line_error(result, "no linear layer named qproj")
    assert not (tmp_path / "o").exists()


def test_existing_adapter_is_not_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    assert_one_line_error(run_cli("--doc", DOC, "--out", str(out)), "already holds an adapter")
    assert (out / "adapter_config.json").read_text() == "{}"


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_an_out_folder_of_other_files_is_never_replaced(tmp_path, force):
    # The finished run replaces its whole folder: that must never be a folder of the user's own files.
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("keep me")
    result = run_cli("--doc", DOC, "--out", str(notes) + "/", "--model", str(tmp_path / "no model"), *force)
    assert_one_line_error(result, "holds other files")
    assert (notes / "mine.txt").read_text() == "keep me"


def test_an_earlier_run_beside_other_files_is_not_replaced_even_with_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("adapter_config.json", "report.json", "mine.txt"):
        (out / name).write_text("{}")
    result = run_cli("--doc", DOC, "--out", str(out), "--force", "--model", str(tmp_path / "no model"))
    assert_one_line_error(result, "holds other files than an earlier run's")
    assert (out / "mine.txt").read_text() == "{}"


def test_an_out_that_is_a_file_is_refused(tmp_path):
    out = tmp_path / "out"
    out.write_text("keep me")
    assert_one_line_error(run_cli("--doc", DOC, "--out", str(out), "--model", str(tmp_path / "no model")),
                          "is a file")
    assert out.read_text() == "keep me"


# End to end on a tiny random model. It cannot write questions, so the gold questions stand in; its random
# answers state no fact of the document, so they are kept as written (--pairs-per-fact 0).

@pytest.fixture
def tiny_run(tiny_llama, tmp_path, monkeypatch):
    path, _ = tiny_llama
    questions = [json.loads(line)["question"] for line in open(QA)]
    monkeypatch.setattr(pd, "generate_questions",
                        lambda net, prompts, passages, settings, gen: [(i % len(passages), q, "")
                                                                       for i, q in enumerate(questions)])
    out = tmp_path / "run"

    def run(*extra):
        monkeypatch.setattr(sys, "argv", ["prompt_distill.py", "--doc", DOC, "--model", path, "--out", str(out),
                                          "--epochs", "1", "--batch-size", "4", "--pairs-per-fact", "0", *extra])
        return pd.main()
    return run, out


def test_end_to_end_on_a_tiny_model_writes_adapter_qa_and_report(tiny_run, tiny_llama):
    run, out = tiny_run
    assert run("--eval", QA) == 0
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "qa.jsonl", "report.json"]
    report = json.load(open(out / "report.json"))
    assert set(report["accuracy"]) == {"closed_book", "open_book", "distilled"}
    forgetting = {"retention_base", "retention_adapted", "leakage_base", "leakage_adapted", "drift",
                  "retention_lost", "retention_lost_on_near_ties"}
    assert forgetting <= set(report["forgetting"])
    assert all(0 <= a["base_margin"] <= 1 for a in report["general_answers"])
    assert set(report["peak_memory_gb"]) == set(report["seconds"])
    assert (report["peak_gpu_memory_gb"] is None) == (not torch.cuda.is_available())  # the run's device: the default
    assert len(report["eval"]) == sum(1 for _ in open(QA))
    assert set(report["eval"][0]) == {"question", "answers", "closed_book", "open_book", "distilled",
                                      "pairs_stating_answer"}
    net, _, _ = m.load(tiny_llama[0])
    lora.load_adapter(net, str(out))  # the saved adapter loads back
    assert [p for p in os.listdir(out.parent) if "partial" in p] == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="checks the CUDA path; CI has no GPU")
def test_questions_are_sampled_on_the_models_device(tiny_run, monkeypatch):
    # A CPU generator with CUDA probabilities stops torch.multinomial: --device cuda once died here.
    run, out = tiny_run
    gold_questions = pd.generate_questions  # tiny_run's stand-in

    def sampled(net, prompts, passages, settings, generator):
        m.generate(net, [[1, 2, 3]], 4, temperature=1.0, top_k=5, generator=generator)
        return gold_questions(net, prompts, passages, settings, generator)
    monkeypatch.setattr(pd, "generate_questions", sampled)
    assert run("--eval", QA, "--device", "cuda") == 0


def test_lm_head_joins_the_targets_and_its_adapter_trains_and_loads_back(tiny_run, tiny_llama):
    run, out = tiny_run
    assert run("--eval", QA, "--targets", "q_proj", "v_proj", "lm_head") == 0
    config = json.load(open(out / "adapter_config.json"))
    assert config["target_modules"] == ["lm_head", "q_proj", "v_proj"]
    net, _, _ = m.load(tiny_llama[0])
    lora.load_adapter(net, str(out))
    assert net.lm_head.lora_B.weight.abs().sum() > 0  # trained: B starts at zero


def test_sft_baseline_reports_under_its_own_name(tiny_run):
    run, out = tiny_run
    assert run("--method", "sft", "--no-guard") == 0
    report = json.load(open(out / "report.json"))
    assert "sft" in report["accuracy"] and report["settings"]["guard"] is False
    assert "F1" in report["metric"]  # no --eval: scored on held-out generated questions


def test_nan_loss_stops_and_keeps_no_adapter(tiny_run, monkeypatch, capsys):
    run, out = tiny_run
    monkeypatch.setattr(pd, "distillation_loss", lambda s, t, T: (s.sum() * float("nan")))
    assert run("--no-guard") == 1
    assert "loss became nan" in capsys.readouterr().err
    assert not out.exists() and not [p for p in os.listdir(out.parent) if "partial" in p]


def test_a_non_finite_gradient_stops_and_keeps_no_adapter(tiny_run, monkeypatch, capsys):
    # Under bf16 a finite loss can still overflow in the backward pass; on the last step nothing else would see it.
    run, out = tiny_run
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: torch.tensor(float("inf")))
    assert run("--no-guard") == 1
    assert "gradient norm became inf at step 1" in capsys.readouterr().err
    assert not out.exists()


def test_ctrl_c_during_training_keeps_nothing(tiny_run, monkeypatch, capsys):
    run, out = tiny_run

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(pd, "batch_loss", interrupted)
    assert run() == 130
    assert "interrupted" in capsys.readouterr().err and not out.exists()


def test_the_documents_superlatives_join_the_guard_answered_by_the_base_model(tiny_run, tiny_llama, monkeypatch):
    run, out = tiny_run
    pools, train = [], pd.train
    monkeypatch.setattr(pd, "train", lambda net, examples, *guard_and_settings:
                        pools.append(guard_and_settings[:3]) or train(net, examples, *guard_and_settings))
    assert run("--no-blanks", "--superlative-share", "0.25") == 0
    assert json.load(open(out / "report.json"))["guard_prompts"]["superlatives"] == 4
    assert run("--no-blanks", "--superlative-share", "0", "--force") == 0
    (general, superlatives, _), (general_alone, none, _) = pools
    _, tokenizer, chat = m.load(tiny_llama[0])
    prompts = pd.Prompts(tokenizer, chat)
    asked = pd.superlative_prompts(open(DOC).read())
    assert [e.student for e in superlatives] == [prompts.closed_book(q) for q in asked] and len(asked) == 4
    assert all(e.teacher == e.student and not e.prefix for e in superlatives)  # the base model, no document, teaches
    assert [e.student for e in general] == [e.student for e in general_alone] and none == []


def test_year_rows_are_the_general_prompts_answered_with_a_year_for_a_document_with_years():
    answers = {1: "The Berlin Wall fell in 1989.", 2: "There are 24 hours in a day.", 3: "In 2001, a 12345 ..."}
    general = [pd.Example([], [i], [i], [i]) for i in answers]
    decode = lambda ids: answers[ids[0]]
    assert pd.year_rows(general, "The expedition sailed in 1978.", decode) == [general[0], general[2]]
    assert pd.year_rows(general, "The expedition sailed in spring, 12 days and 2,150 metres.", decode) == []


def test_guard_rows_are_superlatives_and_years_in_their_shares_of_the_draws():
    general = [pd.Example([], [i], [i], [2]) for i in range(300)]
    superlatives = [pd.Example([], [1000 + i], [1000 + i], [2]) for i in range(4)]
    years = general[:10]  # general prompts whose base answer states a year
    settings, rng = pd.Settings(guard_batch=2), random.Random(0)
    rows = [id(row) for _ in range(4000) for row in pd.draw_guard(general, superlatives, years, settings, rng)]
    assert len(rows) == 8000
    superlative_ids, year_ids, general_ids = ({id(e) for e in pool} for pool in (superlatives, years, general))
    drawn = [row for row in rows if row in superlative_ids]
    assert len(drawn) / len(rows) == pytest.approx(settings.superlative_share, abs=0.02)
    assert set(drawn) == superlative_ids  # each one drawn
    # a year row also comes from the general draws, 10 times in 300
    year_rate = settings.year_share + (1 - settings.superlative_share - settings.year_share) * 10 / 300
    assert sum(row in year_ids for row in rows) / len(rows) == pytest.approx(year_rate, abs=0.02)
    assert set(rows) - superlative_ids <= general_ids
    # an empty pool's share goes to the general prompts
    alone = [id(row) for _ in range(2000) for row in pd.draw_guard(general, [], [], settings, rng)]
    assert set(alone) <= general_ids and sum(row in year_ids for row in alone) / len(alone) < 0.06
    assert pd.draw_guard([], [], [], settings, rng) == []  # --no-guard


def spy_on_answers_and_training(monkeypatch, on_answers) -> list:
    """Calls on_answers(passages, asked, stage) on each call for the teacher's answers; returns the list
    that the training examples are collected in."""
    answer, train, trained = pd.answer_open_book, pd.train, []

    def spy_answers(net, prompts, passages, asked, settings, generator, stage="answers"):
        on_answers(passages, asked, stage)
        return answer(net, prompts, passages, asked, settings, generator, stage)

    def spy_train(net, examples, *args):
        trained.extend(examples)
        return train(net, examples, *args)
    monkeypatch.setattr(pd, "answer_open_book", spy_answers)
    monkeypatch.setattr(pd, "train", spy_train)
    return trained


def test_blanks_are_asked_of_the_teacher_and_the_pairs_that_state_a_fact_trained(tiny_run, tiny_llama, monkeypatch):
    run, out = tiny_run
    _, tokenizer, chat = m.load(tiny_llama[0])
    document = open(DOC, encoding="utf-8").read()
    asked_blanks = []

    def on_answers(passages, asked, stage):
        if stage == "blanks":
            assert asked == [(p, q) for p, q, _ in pd.blanked_questions(passages, document)]
            asked_blanks.extend(q for _, q in asked)
    trained = spy_on_answers_and_training(monkeypatch, on_answers)

    def stated(question, answer, words):  # the tiny model's answers state nothing: here every other blank's does
        return {"fact"} if question in asked_blanks[::2] else set()
    monkeypatch.setattr(pd, "stated", stated)
    assert run("--no-guard") == 0  # no --eval: a share of the model's own questions is held out
    stating = asked_blanks[::2]
    assert len(stating) > 10
    pairs = [json.loads(line) for line in open(out / "qa.jsonl")]
    blanks = [p for p in pairs if p["question"] in asked_blanks]
    assert [p["question"] for p in blanks] == stating and not any(p["held_out"] for p in blanks)
    assert any(p["held_out"] for p in pairs)
    prompts = pd.Prompts(tokenizer, chat)
    students = [tuple(e.student) for e in trained]
    assert len(students) == sum(not p["held_out"] for p in pairs)
    assert {tuple(prompts.closed_book(q)) for q in stating} <= set(students)
