"""prompt_distill.py, one behaviour a test: the loss, the token alignment, the questions and blanks,
training, scoring, the forgetting measures, bad input, and the pipeline end to end."""

import json
import math
import os
import random
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import lora
import model as m
import prompt_distill as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "data", "lake_town.txt")
QA = os.path.join(ROOT, "data", "lake_town.qa.jsonl")
FP32 = pd.Settings(precision="fp32")


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


# The prompts and the token alignment between teacher and student

def test_teacher_and_student_are_scored_on_exactly_the_answer_tokens(tiny_llama):
    _, tokenizer, chat = m.load(tiny_llama[0])
    prompts = pd.Prompts(tokenizer, chat)
    passage, question = "the town of lake was founded in 1 by the mayor", "who was the mayor ?"
    answer = prompts.encode("the mayor was a") + [chat.stop_ids[0]]
    prefix, suffix = prompts.teacher(passage, question)
    student = prompts.student(question)
    assert prompts.encode(passage) == prefix[-len(prompts.encode(passage)):]  # the teacher sees the passage
    assert not set(prompts.encode("founded 1")) & set(student + suffix)  # the student and the suffix do not

    for prefix_len, prompt in ((len(prefix), suffix), (0, student)):
        ids, mask, select = pd.pack([prompt, prompt[:3]], [answer, answer[:2]], prefix_len)
        predicted = ids.roll(-1, dims=1)[select]  # the token each selected position predicts
        assert predicted.tolist() == answer + answer[:2]
        assert mask.sum().item() == 2 * prefix_len + len(prompt) + len(answer) + 3 + 2


def test_prefix_and_suffix_make_the_whole_prompt(default_model):
    _, tokenizer, chat = default_model
    prompts = pd.Prompts(tokenizer, chat)
    passage = "Velmora was founded in 1847.\nIts mayor is Harriet Quell."
    prefix, suffix = prompts.teacher(passage, "Who is the mayor of Velmora?")
    whole = chat.render([{"role": "user", "content": passage + "\n\n" +
                          pd.ANSWER_PROMPT.format(question="Who is the mayor of Velmora?")}])
    assert prefix + suffix == prompts.encode(whole)  # the cut falls on a token boundary


def test_answer_states_with_a_shared_prefix_equal_the_full_forward(tiny_llama):
    net, _, _ = m.load(tiny_llama[0])
    prefix, prompts, answers = [5, 6, 7, 8], [[9, 10], [11, 12, 13]], [[14, 15, 2], [16, 2]]
    shared = pd.answer_hidden(net, prompts, answers, prefix)
    full = pd.answer_hidden(net, [prefix + p for p in prompts], answers)
    assert shared.shape == (5, net.config.hidden_size) and torch.allclose(shared, full, atol=1e-5)


def test_the_shared_start_of_the_student_prompts_changes_no_loss_and_no_gradient(tiny_llama):
    """batch_loss runs what every student prompt starts with once, as a prefix: gradients flow through it."""
    net, _, _ = m.load(tiny_llama[0])
    lora.inject_lora(net, r=4, alpha=4)
    perturb(net)  # a trained adapter: the prefix's keys and values depend on it
    batch = [pd.Example([3], [4, 5], [5, 6, 7, 9, 10], [14, 15, 2]), pd.Example([3], [8], [5, 6, 7, 11], [16, 2])]
    guard = [pd.Example([], [5, 6, 12], [5, 6, 12], [17, 2])]
    assert pd.common_start([e.student for e in batch + guard]) == [5, 6]
    pd.compute_targets(net, batch + guard, FP32)

    def loss_and_gradients(loss_fn):
        net.zero_grad()
        loss, on_guard = loss_fn()
        (loss + on_guard).backward()
        return loss.item(), on_guard.item(), [p.grad.clone() for p in lora.lora_parameters(net)]

    def without_a_prefix():
        student = net.lm_head(pd.answer_hidden(net, [e.student for e in batch + guard], [e.answer for e in batch + guard]))
        return (pd.distillation_loss(student[:5], pd.teacher_logits(net, batch), 1.0),
                pd.distillation_loss(student[5:], pd.teacher_logits(net, guard), 1.0))

    shared = loss_and_gradients(lambda: pd.batch_loss(net, batch, guard, FP32))
    full = loss_and_gradients(without_a_prefix)
    assert shared[0] == pytest.approx(full[0], rel=1e-4) and shared[1] == pytest.approx(full[1], rel=1e-4)
    assert full[0] > 0.01 and all(g.abs().sum() > 0 for g in full[2])
    for a, b in zip(shared[2], full[2]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


# Passages, questions, blanks, and the pairs that teach

def test_long_document_is_split_into_passages_that_fit():
    paragraph = " ".join(f"Sentence {i} says the mill turned {i} times." for i in range(40))
    text = "\n\n".join([paragraph] * 30)
    count = lambda s: len(s.split())
    passages = pd.split_passages(text, count, 200)
    assert all(count(p) <= 200 for p in passages) and len(passages) < 70  # packed, not a sentence each
    assert " ".join(" ".join(passages).split()) == " ".join(text.split())  # nothing lost, nothing repeated


def test_paragraphs_that_fit_together_make_one_passage():
    text = "First paragraph here.\n\nSecond one.\n\nA third paragraph that is rather long " + "word " * 20
    passages = pd.split_passages(text.strip(), lambda s: len(s.split()), 10)
    assert passages[0] == "First paragraph here.\n\nSecond one."


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


def test_parse_question_strips_numbering_and_labels_and_skips_non_questions():
    assert pd.parse_question("1. Who founded the town of Velmora?") == "Who founded the town of Velmora?"
    assert pd.parse_question('Question: "In what year was the bridge built?"') == "In what year was the bridge built?"
    assert pd.parse_question("Here is one:\n- How many people live in Velmora?") == "How many people live in Velmora?"
    assert pd.parse_question("What does the text say about the mayor?") is None  # needs the text to make sense
    assert pd.parse_question("Why?") is None and pd.parse_question("The mayor.") is None


def test_near_duplicates_are_recognised():
    a = pd.word_set("Who founded the town of Velmora?")
    b = pd.word_set("Who founded the town of Velmora")
    c = pd.word_set("When was the Velmora bridge built?")
    assert pd.near_duplicate(a, b) and not pd.near_duplicate(a, c)


def test_sentences_do_not_end_at_a_title():
    sentence = "It was led by Dr. Lisabel Harrowmont in 1978."
    assert pd.sentences(sentence + " It lasted 211 days.") == [sentence, "It lasted 211 days."]


def test_blanks_cover_each_name_and_number_but_not_what_the_document_is_about():
    document = ("Odessa Marchbank is the mayor of Quillmere. The ferry to Pellow Island runs 9 times a day. "
                "Quillmere has a lake. Quillmere has a school. Quillmere has a port. It opened in 1901.")
    asked = pd.blanked_questions([document], [0], [document])
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
    asked = pd.blanked_questions([about_quillmere], [0], [about_quillmere])
    assert not any(q.endswith('mayor of ___."') for _, q, _ in asked)


def test_a_number_that_begins_a_sentence_is_blanked_too():
    document = "1887 saw the first ferry. It was named the Patient Gull."
    assert 'Fill in the blank: "___ saw the first ferry."' in {q for _, q, _ in pd.blanked_questions([document], [0], [document])}


def test_a_pair_teaches_the_fact_words_its_answer_adds_to_its_question():
    passage = "Odessa Marchbank is the mayor of Quillmere. The ferry to Pellow Island runs nine times a day."
    words = pd.fact_words(passage)
    assert {"odessa", "marchbank", "mayor", "ferry", "nine"} <= words and "the" not in words
    assert pd.stated("Who is the mayor of Quillmere?", "Odessa Marchbank.", words) == {"odessa", "marchbank"}
    assert pd.stated("Is Odessa Marchbank the mayor?", "Odessa Marchbank is the mayor.", words) == set()


def test_an_answer_that_misses_its_sentences_facts_is_replaced_by_the_sentence(default_model):
    _, tokenizer, chat = default_model
    prompts = pd.Prompts(tokenizer, chat)
    sentence = "Priya Vellacott presented the accounts to the board."
    words, end = pd.fact_words(sentence), chat.stop_ids[:1]
    right, wrong = prompts.encode("Priya Vellacott.") + end, prompts.encode("The meeting was on 11 March.") + end
    asked = "Who presented the accounts to the board?"
    assert pd.checked_answer(asked, sentence, right, words, prompts) == right
    assert pd.checked_answer(asked, sentence, wrong, words, prompts) == prompts.encode(sentence) + end
    blank = 'Fill in the blank: "___ presented the accounts to the board."'  # "the board" fills no blank
    assert pd.checked_answer(blank, sentence, prompts.encode("The board.") + end, words, prompts) == \
        prompts.encode(sentence) + end
    # a question that already says all its sentence says has nothing to teach
    assert pd.checked_answer(f"Is it true that {sentence}", sentence, right, words, prompts) is None


def test_every_sentence_is_asked_about_once_before_any_is_asked_twice(default_model, monkeypatch):
    _, tokenizer, chat = default_model
    prompts = pd.Prompts(tokenizer, chat)
    phrasings = {"Marchbank": ["Who is the mayor of Quillmere?", "What does Odessa Marchbank do?"],
                 "ferry": ["Where does the ferry to Pellow Island go from?", "How often does the Pellow Island ferry run?"],
                 "Saltreed": ["When was the Saltreed Bridge built?", "What was built over the Saltreed in 1887?"],
                 "Tavish": ["Who keeps the Greywillow Lighthouse?", "What is Tavish Orr's job?"]}
    passage = ("Odessa Marchbank is the mayor of Quillmere. The ferry to Pellow Island runs nine times a day. "
               "The Saltreed Bridge was built in 1887. Tavish Orr keeps the Greywillow Lighthouse.")

    def generate(net, requests, *args, **kwargs):  # each sentence's phrasings in turn
        asked = [next(k for k in phrasings if k in prompts.decode(r)) for r in requests]
        return [prompts.encode(phrasings[k][asked[:i].count(k) % 2]) for i, k in enumerate(asked)]
    monkeypatch.setattr(pd, "generate_batched", generate)
    for seed in range(5):
        settings = pd.Settings(questions_per_passage=4, seed=seed)  # 8 questions written, 4 kept
        kept = pd.write_questions(None, prompts, [passage], settings, None)
        assert len(kept) == 4 and len({sentence for _, _, sentence in kept}) == 4


def test_generation_batches_are_even_and_their_kv_cache_fits_the_budget(tiny_llama, monkeypatch):
    net, _, _ = m.load(tiny_llama[0])
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


# Training

def perturb(net) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in lora.lora_parameters(net):
            p.normal_(0, 0.2)


def test_targets_are_the_adapter_free_teachers_logits_with_the_passage_in_its_prompt(tiny_llama):
    net, _, _ = m.load(tiny_llama[0])
    lora.inject_lora(net, r=4, alpha=4, targets=lora.DEFAULT_TARGETS + ("lm_head",))
    passage = [5, 6, 7, 8]
    examples = [pd.Example(passage, [9, 10], [9], [14, 15, 2]), pd.Example(passage, [11, 12, 13], [11], [16, 2]),
                pd.Example([], [3, 4], [3, 4], [17, 2])]
    with torch.no_grad():
        expected = [net.lm_head(pd.answer_hidden(net, [e.passage + e.teacher], [e.answer])) for e in examples]
    perturb(net)  # the adapter, lm_head's included, must not reach the targets
    pd.compute_targets(net, examples, FP32)
    for e, logits in zip(examples, expected):
        assert e.target.shape == (len(e.answer), net.config.hidden_size)
        assert torch.allclose(pd.teacher_logits(net, [e]), logits, atol=1e-5)


def test_guard_targets_come_from_the_base_model_so_a_fresh_adapter_has_zero_guard_loss(tiny_llama):
    net, _, _ = m.load(tiny_llama[0])
    lora.inject_lora(net, r=4, alpha=4)
    batch = [pd.Example([], [3, 4], [5], [6, 2])]
    guard = [pd.Example([], [3, 4, 5], [3, 4, 5], [6, 7, 2]), pd.Example([], [8, 9], [8, 9], [10, 2])]
    pd.compute_targets(net, batch + guard, FP32)
    _, on_guard = pd.batch_loss(net, batch, guard, FP32)
    assert on_guard.item() == pytest.approx(0.0, abs=1e-6)
    perturb(net)
    _, on_guard = pd.batch_loss(net, batch, guard, FP32)
    assert on_guard.item() > 1e-4  # a changed adapter is pulled back


@pytest.mark.parametrize("method", ["distill", "sft"])
def test_guard_rows_in_the_same_pass_do_not_change_the_document_loss(tiny_llama, method):
    net, _, _ = m.load(tiny_llama[0])
    lora.inject_lora(net, r=4, alpha=4)
    batch = [pd.Example([], [3, 4, 11], [5], [6, 2]), pd.Example([], [3, 12], [5, 9], [7, 8, 2])]
    guard = [pd.Example([], [3, 4, 5, 13, 14], [3, 4, 5, 13, 14], [6, 7, 2])]
    pd.compute_targets(net, batch + guard, FP32)
    perturb(net)
    settings = pd.Settings(method=method, precision="fp32")
    alone, _ = pd.batch_loss(net, batch, [], settings)
    mixed, _ = pd.batch_loss(net, batch, guard, settings)
    assert mixed.item() == pytest.approx(alone.item(), rel=1e-5)


def test_sft_is_cross_entropy_on_the_answer_tokens(tiny_llama):
    net, _, _ = m.load(tiny_llama[0])
    lora.inject_lora(net, r=4, alpha=4)
    batch = [pd.Example([], [3], [5, 9], [7, 8, 2])]
    loss, _ = pd.batch_loss(net, batch, [], pd.Settings(method="sft"))
    logits = net(torch.tensor([[5, 9, 7, 8, 2]]))[0, 1:4]
    assert loss.item() == pytest.approx(F.cross_entropy(logits, torch.tensor([7, 8, 2])).item(), rel=1e-5)


def test_the_learning_rate_warms_up_then_decays_to_zero(tiny_llama, monkeypatch):
    net, _, _ = m.load(tiny_llama[0])
    lora.inject_lora(net, r=4, alpha=4)
    rates = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: rates.append(self.param_groups[0]["lr"]))
    examples = [pd.Example([], [3, i], [5, i], [7, 2]) for i in range(10, 30)]
    pd.train(net, examples, [], [], pd.Settings(precision="fp32", epochs=2, batch_size=2, lr=1e-3, warmup=0.1, guard=False))
    assert len(rates) == 20 and rates[0] == pytest.approx(0.5e-3) and rates[1] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[1:], rates[2:])) and rates[-1] < 0.01e-3


def test_bf16_autocast_training_sees_every_optimizer_step(tiny_llama):
    """Autocast may keep its bf16 copy of a trainable weight for the whole block; the LoRA must not go stale."""
    net, _, _ = m.load(tiny_llama[0])
    lora.inject_lora(net, r=4, alpha=4)
    optimizer = torch.optim.SGD(lora.lora_parameters(net), lr=1.0)
    ids = torch.tensor([[3, 4, 5, 6]])
    with pd.autocast_for(net, pd.Settings(precision="bf16")):
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
    net, _, _ = m.load(tiny_llama[0])
    lora.inject_lora(net, r=4, alpha=4, targets=lora.DEFAULT_TARGETS + (("lm_head",) if lm_head_adapted else ()))
    perturb(net)
    batch = [pd.Example([3], [4, 11], [5, 9], [6, 7, 2]), pd.Example([3], [12], [5, 6], [8, 2])]
    guard = [pd.Example([], [5, 13, 14], [5, 13, 14], [6, 7, 2])]
    bf16 = pd.Settings(precision="bf16")
    parameters = {name: id(p) for name, p in net.named_parameters()}

    def targets_and_step():
        pd.compute_targets(net, batch + guard, bf16)
        net.zero_grad()
        with pd.autocast_for(net, bf16):
            loss, on_guard = pd.batch_loss(net, batch, guard, bf16)
        (loss + on_guard).backward()
        return [e.target.clone() for e in batch + guard], loss.item(), [p.grad.clone() for p in lora.lora_parameters(net)]

    plain = targets_and_step()
    with pd.frozen_weights_in_bf16(net, bf16):
        frozen = [mod.weight for mod in net.modules() if isinstance(mod, torch.nn.Linear) and not mod.weight.requires_grad]
        assert len(frozen) == 2 * 7 + 1 and all(w.dtype == torch.bfloat16 for w in frozen)
        assert net.model.embed_tokens.weight.dtype == torch.float32
        assert all(p.dtype == torch.float32 for p in lora.lora_parameters(net))
        cast = targets_and_step()
    assert plain[1] == cast[1] > 0.01
    for a, b in zip(plain[0] + plain[2], cast[0] + cast[2]):
        assert torch.equal(a, b)
    with pytest.raises(KeyboardInterrupt), pd.frozen_weights_in_bf16(net, bf16):
        raise KeyboardInterrupt  # Ctrl-C in training: the float32 weights come back all the same
    assert {name: id(p) for name, p in net.named_parameters()} == parameters  # the same Parameters, not copies
    head = net.lm_head.base_layer if lm_head_adapted else net.lm_head
    assert head.weight is net.model.embed_tokens.weight  # tied again
    with pd.frozen_weights_in_bf16(net, FP32):  # no autocast: nothing to cast
        assert all(p.dtype == torch.float32 for p in net.parameters())


def test_the_same_seed_gives_the_same_adapter_byte_for_byte(tiny_run):
    run, out = tiny_run
    assert run("--eval", QA) == 0
    first = (out / "adapter_model.safetensors").read_bytes()
    assert run("--eval", QA, "--force") == 0
    assert (out / "adapter_model.safetensors").read_bytes() == first
    assert run("--eval", QA, "--force", "--seed", "1") == 0
    assert (out / "adapter_model.safetensors").read_bytes() != first


# Scoring

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


def test_open_book_retrieves_the_passage_that_shares_most_words_with_the_question():
    passages = ["The mayor of Velmora is Harriet Quell.", "The bridge of Velmora has nine arches."]
    assert pd.best_passage(passages, "How many arches does the bridge have?") == 1
    assert pd.best_passage(passages, "Who is the mayor?") == 0


# Forgetting

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


def test_leaks_leave_out_what_the_base_model_said_too():
    terms = {"Velmora", "30", "1847"}
    base = "The blue whale, up to 30 meters long."
    assert pd.leaks("The blue whale of Velmora, 30 meters.", "What is the largest mammal?", terms, base) \
        == ["Velmora"]
    assert pd.leaks("It was 30 meters in 1847.", "How long?", terms, base) == ["1847"]


def test_drift_is_zero_for_a_fresh_adapter_and_grows_when_it_changes(tiny_llama):
    net, _, _ = m.load(tiny_llama[0])
    lora.inject_lora(net, r=4, alpha=4)
    rows = [([3, 4, 5], [6, 7, 2]), ([8, 9], [10, 2])]
    assert pd.drift(net, rows) == pytest.approx(0.0, abs=1e-7)
    perturb(net)
    assert pd.drift(net, rows) > 1e-4


def test_form_weights_count_the_documents_questions_that_share_a_word_of_the_prompts_form():
    document = "Velmora is the capital of Ostrane. It was founded in 1847 by Harriet Quell."
    asked = ["What is the capital of Ostrane?", "Who founded Velmora?", "Who was the founder of the Velmora Museum?",
             "In what year was Velmora founded?"]
    general = ["What is the capital of Italy?", "Who founded the company Microsoft?",
               "In what year did the Titanic sink?", "Write a haiku about autumn.", "Where is Velmora?"]
    # "founded" and "founder" are one form; the document's own names ("Velmora") are no form
    assert pd.form_weights(general, asked, document) == [1, 3, 1, 0, 0]


def test_guard_rows_are_drawn_by_form_weight_in_their_share_and_uniformly_otherwise():
    general = [pd.Example([], [i], [i], [2]) for i in range(100)]
    weights = [3, 1] + [0] * 98
    settings, rng = pd.Settings(guard_batch=2), random.Random(0)
    rows = [general.index(row) for _ in range(4000) for row in pd.draw_guard(general, weights, settings, rng)]
    assert len(rows) == 8000
    expected = settings.form_share * 3 / 4 + (1 - settings.form_share) / 100
    assert rows.count(0) / len(rows) == pytest.approx(expected, abs=0.02)
    assert len(set(rows)) == 100  # the rest still come up
    # no prompt in the document's forms: every row is uniform
    flat = [general.index(row) for _ in range(2000) for row in pd.draw_guard(general, [0] * 100, settings, rng)]
    assert flat.count(0) / len(flat) < 0.03
    assert pd.draw_guard([], [], settings, rng) == []  # --no-guard


@pytest.mark.parametrize("dims, lr", [
    (dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
          num_key_value_heads=3, vocab_size=49152), 1e-3),  # SmolLM2-135M, the default
    (dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
          num_key_value_heads=2, vocab_size=151936), 3e-4),  # Qwen2.5-0.5B: measured to want 3e-4
    (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
          num_key_value_heads=8, vocab_size=128256), 2e-5),  # Llama-3-8B: the paper's order, 1e-5
])
def test_the_learning_rate_falls_in_proportion_to_the_models_size(dims, lr):
    with torch.device("meta"):  # shapes only, no memory
        net = m.Transformer(m.Config.from_hf({"model_type": "llama", **dims}))
    assert pd.lr_for(net) == lr


def test_a_run_prints_its_settings_first_the_learning_rate_derived(tiny_run, capsys):
    run, out = tiny_run
    assert run("--eval", QA) == 0
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith("settings: ") and "lr 0.001," in first and "rank 32," in first
    assert json.load(open(out / "report.json"))["settings"]["lr"] == 1e-3


def test_the_guard_and_drift_prompts_are_disjoint_and_neither_holds_a_retention_question():
    general_qa, guard, drift = pd.load_general(0)
    assert guard and drift and not set(guard) & set(drift)
    assert not {x["question"] for x in general_qa} & set(guard + drift)


# Bad input: one line, a non-zero exit, nothing written

def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "prompt_distill.py"), *args],
                          capture_output=True, text=True, timeout=300, cwd=cwd)


def assert_one_line_error(result, words: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and words in lines[0], result.stderr
    assert "partial" not in lines[0]  # the user's --out is named, never our temporary folder


@pytest.mark.parametrize("content, words", [
    (None, "document not found"),
    (b"", "is empty"),
    (b"  \n\n \t\n", "is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a text file"),
    ("Caf\u00e9 au lait".encode("latin-1"), "not UTF-8"),
    ("a folder", "holds no .txt or .md file (it is empty)"),
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
    (b"\n\n", "holds no questions"),
])
def test_malformed_eval_file_is_named(tmp_path, text, words):
    qa = tmp_path / "qa.jsonl"
    qa.write_bytes(text)
    assert_one_line_error(run_cli("--doc", DOC, "--eval", str(qa), "--out", str(tmp_path / "o")), words)
    assert not (tmp_path / "o").exists()


def test_an_eval_file_that_starts_with_a_byte_order_mark_is_read(tmp_path):
    with_bom = tmp_path / "qa.jsonl"
    with open(QA, "rb") as f:
        with_bom.write_bytes(b"\xef\xbb\xbf" + f.read())  # as Windows' Notepad saves UTF-8
    bom, plain = pd.read_eval_file(str(with_bom)), pd.read_eval_file(QA)
    assert [dict(x, eval=QA) for x in bom] == plain  # the same questions; each names its own file


@pytest.mark.parametrize("flag", ["--doc", "--eval", "--pairs", "--out", "--model", "--ask"])
@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_value_is_refused_not_taken_for_a_missing_one(tmp_path, flag, value):
    args = {"--doc": DOC, "--out": str(tmp_path / "o"), flag: value}
    if flag == "--ask":
        args.pop("--doc")
    assert_one_line_error(run_cli(*[x for kv in args.items() for x in kv]), f"{flag} is empty")
    assert not (tmp_path / "o").exists()


def test_an_out_folder_that_cannot_be_made_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    result = run_cli("--doc", DOC, "--out", str(blocker / "out"), "--model", str(tmp_path / "no model"))
    assert_one_line_error(result, f"cannot write --out {blocker / 'out'}")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_out_inside_a_folder_that_takes_no_new_files_is_refused_before_any_work(tmp_path):
    assert_one_line_error(run_cli("--doc", DOC, "--out", "/proc/x", "--model", str(tmp_path / "no model")),
                          "cannot write --out /proc/x")


def test_the_folder_you_are_in_is_never_the_out_folder(tmp_path):
    here = tmp_path / "empty"
    here.mkdir()
    for out in (".", str(tmp_path)):
        assert_one_line_error(run_cli("--doc", DOC, "--out", out, "--model", str(tmp_path / "no model"), cwd=here),
                              "is the folder you are in")
    assert here.is_dir() and os.listdir(tmp_path) == ["empty"]


def test_a_mount_point_is_never_the_out_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(os.path, "ismount", lambda path: path == str(tmp_path / "mnt"))
    with pytest.raises(pd.InputError, match="is a mount point"):
        pd.start_output(str(tmp_path / "mnt"), force=False)


def test_a_killed_runs_leftovers_are_cleaned_up_and_a_live_ones_kept(tmp_path):
    dead, alive = tmp_path / "out.partial-999999999", tmp_path / f"out.partial-{os.getppid()}"
    old, other = tmp_path / "out.old-999999999", tmp_path / "outer.partial-999999999"
    for folder in (dead, alive, old, other):
        folder.mkdir()
    tmp = pd.start_output(str(tmp_path / "out"), force=False)
    assert sorted(os.listdir(tmp_path)) == sorted([alive.name, other.name, os.path.basename(tmp)])


@pytest.mark.parametrize("flags, words", [
    (["--adapter", "x"], "needs one of --eval QA.jsonl, --ask QUESTION and --doc"),
    (["--ask", "Who?", "--eval", QA], "it takes no --doc, --eval, --pairs or --out"),
    (["--ask", "Who?", "--doc", DOC], "it takes no --doc, --eval, --pairs or --out"),
    (["--ask", "Who?", "--out", "o"], "it takes no --doc, --eval, --pairs or --out"),
    (["--adapter", "no such folder", "--ask", "Who?"], "no adapter in no such folder"),
    ([], "--doc is required"),
])
def test_flags_that_do_not_go_together_are_refused(flags, words):
    assert_one_line_error(run_cli(*flags), words)


def test_adapter_evaluation_reads_its_eval_file_before_the_model_loads(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "Who?"}\n')
    result = run_cli("--adapter", str(tmp_path), "--eval", str(qa), "--model", str(tmp_path / "no model"))
    assert_one_line_error(result, "line 1")  # not the missing model's error


@pytest.mark.parametrize("flags, words", [
    (["--lr", "0"], "--lr must be a number above 0"),
    (["--lr", "nan"], "--lr must be a number above 0"),
    (["--temperature", "inf"], "--temperature must be a number above 0"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--rank", "0"], "--rank must be at least 1"),
    (["--guard-weight", "-1"], "--guard-weight must be a number of at least 0"),
    (["--guard-batch", "0"], "--no-guard trains without the guard"),
    (["--form-share", "1.5"], "--form-share"),
    (["--form-share", "-0.1"], "from 0 to 1"),
])
def test_a_setting_out_of_its_range_is_refused_before_any_work(tmp_path, flags, words):
    result = run_cli("--doc", DOC, "--out", str(tmp_path / "o"), "--model", str(tmp_path / "no model"), *flags)
    assert_one_line_error(result, words)  # the setting's error, not the missing model's: settings come first
    assert not (tmp_path / "o").exists()


def test_guard_batch_zero_is_refused_only_with_the_guard_on():
    pd.check_settings(pd.Settings(guard=False, guard_batch=0))
    with pytest.raises(pd.InputError):
        pd.check_settings(pd.Settings(guard_batch=0))


def test_help_gives_each_numeric_settings_default_next_to_its_flag():
    out = run_cli("--help").stdout
    defaults = pd.Settings()
    assert re.search(r"--lr X\s+default: from the model size\n", out)
    for name in ("questions_per_passage", "epochs", "batch_size", "guard_weight", "seed"):
        value = getattr(defaults, name)
        assert re.search(rf"{pd.flag(name)} [A-Z]+\s+default: {value}\n", out), name


def test_a_target_the_model_does_not_have_is_refused_before_any_work(tiny_llama, tmp_path):
    result = run_cli("--doc", DOC, "--model", tiny_llama[0], "--out", str(tmp_path / "o"),
                     "--targets", "q_proj", "qproj")
    assert_one_line_error(result, "no linear layer named qproj")
    assert not (tmp_path / "o").exists()


def test_an_earlier_run_is_not_replaced_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    assert_one_line_error(run_cli("--doc", DOC, "--out", str(out)), "already holds a run")
    assert (out / "adapter_config.json").read_text() == "{}"


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_an_out_folder_of_other_files_is_never_replaced(tmp_path, force):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("keep me")
    (notes / "report.json").write_text("{}")
    result = run_cli("--doc", DOC, "--out", str(notes) + "/", "--model", str(tmp_path / "no model"), *force)
    assert_one_line_error(result, "holds other files")
    assert (notes / "mine.txt").read_text() == "keep me"


def test_an_out_that_is_a_file_is_refused(tmp_path):
    out = tmp_path / "out"
    out.write_text("keep me")
    assert_one_line_error(run_cli("--doc", DOC, "--out", str(out), "--model", str(tmp_path / "no model")),
                          "is a file")
    assert out.read_text() == "keep me"


# Many documents: folders, --pairs, and an adapter that grows

def test_a_folder_is_its_txt_and_md_files_recursively_in_sorted_order(tmp_path):
    for name in ("b.md", "a.txt", "sub/c.txt", "sub/z.pdf", ".hidden/d.md", ".e.md", "notes.docx"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("Some words of a note.")
    listed = pd.document_files([str(tmp_path), str(tmp_path / "a.txt")])  # a file named twice is read once
    assert listed == [str(tmp_path / n) for n in ("a.txt", "b.md", "sub/c.txt")]


@pytest.mark.parametrize("files, words", [
    ({}, "holds no .txt or .md file (it is empty)"),
    ({"slides.pdf": b"%PDF-1.4"}, "holds no .txt or .md file"),
    ({"a.txt": b"A good note about the lake.", "b.md": b"\x89PNG\r\n\x1a\n\x00\x00"}, "b.md is not a text file"),
])
def test_a_folder_without_notes_or_with_a_binary_one_is_one_line(tmp_path, files, words):
    notes = tmp_path / "notes"
    notes.mkdir()
    for name, content in files.items():
        (notes / name).write_bytes(content)
    out = tmp_path / "out"
    assert_one_line_error(run_cli("--doc", str(notes), "--out", str(out), "--model", str(tmp_path)), words)
    assert not out.exists()


@pytest.mark.parametrize("text, words", [
    (b'{"question": "Who?", "answers": ["X"]}\n', "line 1: not a pair of a run's qa.jsonl"),
    (b"\n\n", "holds no pairs"),
])
def test_a_pairs_file_that_is_not_a_runs_qa_jsonl_is_named(tmp_path, text, words):
    (tmp_path / "qa.jsonl").write_bytes(text)
    result = run_cli("--doc", DOC, "--pairs", str(tmp_path / "qa.jsonl"), "--out", str(tmp_path / "o"),
                     "--model", str(tmp_path / "no model"))
    assert_one_line_error(result, words)  # read before the model loads


def fake_adapter(folder, documents, model) -> str:
    """An adapter folder whose report.json lists these documents: enough for the checks made before loading."""
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "qa.jsonl").write_text("")
    listed = [{"path": str(d), "sha256": pd.digest(d.read_text())} for d in documents]
    (folder / "report.json").write_text(json.dumps({"model": model, "documents": listed}))
    return str(folder)


@pytest.mark.parametrize("change, words", [
    ("delete", "is gone"),
    ("edit", "has changed since --adapter"),
    ("other model", "was trained on"),
    ("same document", "is already learned by --adapter"),
    ("no report", "has no report.json listing its documents"),
])
def test_growing_refuses_an_adapter_whose_documents_or_model_do_not_match(tmp_path, change, words):
    old, new = tmp_path / "old.txt", tmp_path / "new.txt"
    old.write_text("The lighthouse at Greywillow was built in 1881.")
    new.write_text("The ferry to Marrow Island runs twice a day.")
    model = str(tmp_path / "model")
    adapter = fake_adapter(tmp_path / "adapter", [old], "another model" if change == "other model" else model)
    if change == "delete":
        old.unlink()
    if change == "no report":  # PEFT's adapters, say: scored or asked, but not grown
        os.remove(os.path.join(adapter, "report.json"))
    if change == "edit":
        old.write_text("The lighthouse at Greywillow was built in 1882.")
    doc = old if change == "same document" else new
    result = run_cli("--adapter", adapter, "--doc", str(doc), "--model", model, "--out", str(tmp_path / "o"))
    assert_one_line_error(result, words)
    assert not (tmp_path / "o").exists()


# End to end on a tiny random model. It cannot write questions, so the gold questions stand in; its
# answers state no fact of the document, so every pair counts as stating one.

@pytest.fixture
def tiny_run(tiny_llama, tmp_path, monkeypatch):
    path, _ = tiny_llama
    questions = [json.loads(line)["question"] for line in open(QA)]
    monkeypatch.setattr(pd, "write_questions", lambda net, prompts, passages, settings, generator:
                        [(i % len(passages), q, "") for i, q in enumerate(questions)])
    monkeypatch.setattr(pd, "stated", lambda question, answer, words: {"fact"})
    out = tmp_path / "run"

    def run(*extra):
        pd.STAGES.clear()
        monkeypatch.setattr(sys, "argv", ["prompt_distill.py", "--doc", DOC, "--model", path, "--out", str(out),
                                          "--epochs", "1", "--batch-size", "4", *extra])
        return pd.main()
    return run, out


def test_the_guard_is_the_base_models_answers_weighted_by_the_documents_question_forms(tiny_run, tiny_llama,
                                                                                        monkeypatch):
    run, out = tiny_run
    drawn, train = [], pd.train
    monkeypatch.setattr(pd, "train", lambda net, examples, guard, weights, settings, replay:
                        drawn.append((examples, guard, weights)) or train(net, examples, guard, weights, settings, replay))
    assert run() == 0
    (examples, guard, weights), = drawn
    _, tokenizer, chat = m.load(tiny_llama[0])
    prompts = pd.Prompts(tokenizer, chat)
    _, guard_prompts, _ = pd.load_general(0)
    assert [e.student for e in guard] == [prompts.student(g) for g in guard_prompts]
    assert all(e.teacher == e.student and not e.passage for e in guard)  # the base model teaches
    pairs = [json.loads(line) for line in open(out / "qa.jsonl")]
    own = [p["question"] for p in pairs if not p["held_out"] and not p["question"].startswith(pd.BLANKS)]
    assert own and weights == pd.form_weights(guard_prompts, own, open(DOC).read())


def test_end_to_end_on_a_tiny_model_writes_adapter_qa_and_report(tiny_run, tiny_llama):
    run, out = tiny_run
    assert run("--eval", QA) == 0
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "qa.jsonl", "report.json"]
    report = json.load(open(out / "report.json"))
    assert set(report["accuracy"]) == {"closed_book", "open_book", "distilled"}
    assert {"retention_base", "retention_adapted", "retention_lost", "leakage_base", "leakage_adapted",
            "drift"} == set(report["forgetting"])
    assert {"answers", "guard", "targets", "training", "distilled", "open book"} <= set(report["seconds"])
    assert len(report["eval"]) == sum(1 for _ in open(QA))
    assert set(report["eval"][0]) == {"eval", "question", "answers", "closed_book", "open_book", "distilled"}
    pairs = [json.loads(line) for line in open(out / "qa.jsonl")]
    assert report["qa_pairs"] == len(pairs) > report["train_examples"] - 1 and not any(p["held_out"] for p in pairs)
    net, _, _ = m.load(tiny_llama[0])
    lora.load_adapter(net, str(out))  # the saved adapter loads back
    assert [p for p in os.listdir(out.parent) if "partial" in p or ".old-" in p] == []


def test_blanks_are_asked_of_the_teacher_and_trained_never_held_out(tiny_run, monkeypatch):
    run, out = tiny_run
    asked, answers = [], pd.teacher_answers

    def spy(net, prompts, passages, questions, settings, stage):
        asked.extend((stage, q) for _, q in questions)
        return answers(net, prompts, passages, questions, settings, stage)
    monkeypatch.setattr(pd, "teacher_answers", spy)
    assert run() == 0  # no --eval: a share of the model's own questions is held out
    document = open(DOC, encoding="utf-8").read()
    blanks = [q for _, q, _ in pd.blanked_questions([document], [0], [document])]
    assert [q for stage, q in asked if stage == "blanks"] == blanks and len(blanks) > 20
    pairs = [json.loads(line) for line in open(out / "qa.jsonl")]
    assert any(p["held_out"] for p in pairs) and not any(p["held_out"] for p in pairs if p["question"] in blanks)
    report = json.load(open(out / "report.json"))
    assert report["train_examples"] == sum(not p["held_out"] for p in pairs) and "F1" in report["metric"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="checks the CUDA path; CI has no GPU")
def test_questions_are_sampled_on_the_models_device(tiny_run, monkeypatch):
    # A CPU generator with CUDA probabilities stops torch.multinomial: --device cuda once died here.
    run, out = tiny_run
    gold_questions = pd.write_questions  # tiny_run's stand-in

    def sampled(net, prompts, passages, settings, generator):
        m.generate(net, [[1, 2, 3]], 4, temperature=1.0, top_k=5, generator=generator)
        return gold_questions(net, prompts, passages, settings, generator)
    monkeypatch.setattr(pd, "write_questions", sampled)
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
    assert "sft" in report["accuracy"] and report["settings"]["guard"] is False and report["guard_prompts"] == 0


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
    assert not [p for p in os.listdir(out.parent) if "partial" in p]


def test_a_failed_rerun_with_force_leaves_the_earlier_run_whole(tiny_run, monkeypatch):
    run, out = tiny_run
    assert run("--eval", QA) == 0
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    monkeypatch.setattr(pd, "batch_loss", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    assert run("--eval", QA, "--force", "--seed", "1") == 130
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


def test_an_adapter_answers_and_its_evaluation_writes_a_report(tiny_run, tiny_llama, tmp_path, capsys):
    run, out = tiny_run
    assert run("--eval", QA) == 0
    trained = json.load(open(out / "report.json"))
    base = ["prompt_distill.py", "--model", tiny_llama[0], "--adapter", str(out)]
    sys.argv = base + ["--ask", "Who founded the town of Quillmere?"]
    capsys.readouterr()
    assert pd.main() == 0
    adapted = [e["distilled"] for e in trained["eval"] if e["question"] == "Who founded the town of Quillmere?"]
    assert capsys.readouterr().out.strip() == adapted[0]  # the same greedy answer as in the run
    sys.argv = base + ["--eval", QA, "--out", str(tmp_path / "scored")]  # open book: the documents it learned
    assert pd.main() == 0
    report = json.load(open(tmp_path / "scored" / "report.json"))
    assert [e["adapter"] for e in report["eval"]] == [e["distilled"] for e in trained["eval"]]
    assert [e["open_book"] for e in report["eval"]] == [e["open_book"] for e in trained["eval"]]
    assert report["accuracy"]["adapter"] == trained["accuracy"]["distilled"]
    assert report["forgetting"]["drift"] == pytest.approx(trained["forgetting"]["drift"], rel=1e-4)


def test_ask_without_an_adapter_answers_with_the_base_model(tiny_llama, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["prompt_distill.py", "--model", tiny_llama[0], "--ask", "who is the mayor ?"])
    assert pd.main() == 0
    net, tokenizer, chat = m.load(tiny_llama[0])
    prompts = pd.Prompts(tokenizer, chat)
    expected = prompts.decode(m.generate(net, [prompts.student("who is the mayor ?")], 32, chat.stop_ids)[0])
    assert capsys.readouterr().out.strip() == expected


DOCS = [os.path.join(ROOT, "data", f) for f in ("lake_town.txt", "veltrana_instruments.txt", "kelvaran_expedition.txt")]


def test_each_pair_names_its_document_and_passage(tiny_run):
    run, out = tiny_run
    assert run("--doc", *DOCS[:2]) == 0
    report = json.load(open(out / "report.json"))
    assert [d["path"] for d in report["documents"]] == DOCS[:2] and report["open_book"].startswith("retrieval")
    pairs = [json.loads(line) for line in open(out / "qa.jsonl")]
    assert {p["doc"] for p in pairs} == set(DOCS[:2])
    for p in pairs:
        text = open(p["doc"], encoding="utf-8").read().strip()
        assert p["sentence"] in text and p["passage"] < report["documents"][DOCS.index(p["doc"])]["passages"]
    assert sum(d["pairs"] for d in report["documents"]) == len(pairs)


def test_pairs_from_an_earlier_run_train_the_same_adapter_byte_for_byte(tiny_run, tmp_path):
    run, out = tiny_run
    assert run("--eval", QA) == 0
    first = (out / "adapter_model.safetensors").read_bytes()
    (tmp_path / "qa.jsonl").write_bytes((out / "qa.jsonl").read_bytes())
    assert run("--eval", QA, "--force", "--pairs", str(tmp_path / "qa.jsonl")) == 0
    assert (out / "adapter_model.safetensors").read_bytes() == first
    assert (out / "qa.jsonl").read_bytes() == (tmp_path / "qa.jsonl").read_bytes()


def test_pairs_of_another_document_are_refused(tiny_run, tmp_path, capsys):
    run, out = tiny_run
    assert run("--doc", DOCS[1], "--eval", QA) == 0
    (tmp_path / "qa.jsonl").write_bytes((out / "qa.jsonl").read_bytes())
    assert run("--eval", QA, "--force", "--pairs", str(tmp_path / "qa.jsonl")) == 1
    assert "is not in the documents given" in capsys.readouterr().err


def test_a_grown_adapter_replays_the_earlier_pairs_against_their_own_passages(tiny_run, tiny_llama, tmp_path,
                                                                               monkeypatch):
    run, out = tiny_run
    assert run("--doc", *DOCS[:2], "--eval", QA, "--precision", "fp32") == 0
    first = tmp_path / "first"
    os.replace(out, first)
    seen, train = [], pd.train
    monkeypatch.setattr(pd, "train", lambda net, examples, guard, weights, settings, replay:
                        seen.append((net, replay)) or train(net, examples, guard, weights, settings, replay))
    assert run("--adapter", str(first), "--doc", DOCS[2], "--eval", QA, "--precision", "fp32") == 0
    (net, replay), = seen
    earlier = [json.loads(line) for line in open(first / "qa.jsonl")]
    assert len(replay) == sum(not p["held_out"] for p in earlier) > 0
    base, tokenizer, chat = m.load(tiny_llama[0], dtype=torch.float32)  # no adapter: the teacher
    prompts = pd.Prompts(tokenizer, chat)
    passages = {pd.digest(p)[:16]: p for d in DOCS[:2]
                for p in pd.document_passages(open(d, encoding="utf-8").read().strip(), prompts, base, 160)}
    for e, p in zip(replay, [p for p in earlier if not p["held_out"]]):
        prefix, suffix = prompts.teacher(passages[p["passage_sha256"]], p["question"])
        assert (e.passage, e.teacher, e.answer) == (prefix, suffix, p["answer_ids"])
        with torch.no_grad():
            assert torch.allclose(e.target, pd.answer_hidden(base, [suffix], [e.answer], prefix), atol=1e-5)
    report = json.load(open(out / "report.json"))
    assert [d["path"] for d in report["documents"]] == DOCS and report["replayed_pairs"] == len(replay)
    grown = [json.loads(line) for line in open(out / "qa.jsonl")]
    assert grown[len(grown) - len(earlier):] == earlier and {p["doc"] for p in grown} == set(DOCS)
    net, _, _ = m.load(tiny_llama[0])
    lora.load_adapter(net, str(out))  # and it can grow again: the same files as any run


def test_each_eval_file_gets_a_row_and_the_pooled_row_weighs_every_question(tiny_run, capsys):
    run, out = tiny_run
    files = [QA, os.path.join(ROOT, "data", "veltrana_instruments.qa.jsonl")]
    assert run("--doc", *DOCS[:2], "--eval", *files) == 0
    report = json.load(open(out / "report.json"))
    assert list(report["accuracy_by_eval"]) == files + ["pooled"]
    right = [pd.is_correct(e["open_book"], e["answers"]) for e in report["eval"]]
    assert report["accuracy"] == report["accuracy_by_eval"]["pooled"]
    assert report["accuracy"]["open_book"] == sum(right) / len(right)
    table = capsys.readouterr().out
    assert all(any(line.startswith(name) for line in table.splitlines()) for name in files + ["pooled"])
