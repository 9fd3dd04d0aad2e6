"""The real default model (SmolLM2-135M-Instruct, converted from its GGUF) against transformers."""

import os

import pytest
import torch

import model as m

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def reference(default_gguf):
    """transformers reading the same GGUF file itself: its own dequantization and q/k un-permutation."""
    folder, name = os.path.split(default_gguf)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return hf, tokenizer


def chat_ids(tokenizer, chat, text: str) -> list[int]:
    return tokenizer.encode(chat.render([{"role": "user", "content": text}]), add_special_tokens=False).ids


def test_logits_match_transformers_loading_the_gguf(default_model, reference):
    ours, tokenizer, chat = default_model
    hf, _ = reference
    ids = torch.tensor([chat_ids(tokenizer, chat, "Name three rivers in Europe, and say which is longest.")])
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-3


@pytest.mark.parametrize("text", [
    "Hello world",
    "  leading spaces,   runs of   spaces and trailing  ",
    "line one\nline two\n\n\tindented\r\n",
    "12345 and 3.14, 1,000,000 on 2024-01-01",
    "Punctuation!? (brackets) [and] {braces}; 'quotes' \"double\" -- dashes... e.g. don't",
    "Zürich, naïve café, 東京, Ελληνικά, emoji 🙂",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
])
def test_tokenizer_matches_transformers(default_model, reference, text):
    _, tokenizer, _ = default_model
    _, hf_tokenizer = reference
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_chat_template_matches_transformers(default_model, reference):
    _, _, chat = default_model
    _, hf_tokenizer = reference
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    assert chat.render(messages) == hf_tokenizer.apply_chat_template(messages, tokenize=False,
                                                                     add_generation_prompt=True)


CONTEXT = ("The lighthouse on Brimsey Island was built in 1887 by the engineer Tobias Wrenfield. "
           "Its first keeper was a woman named Ada Pellow, who kept the light burning for forty years. "
           "The island's only ferry, the Grey Gannet, sails from the harbour town of Carrowmore.")


@pytest.mark.parametrize("question, name", [
    ("Who built the lighthouse on Brimsey Island?", "Wrenfield"),
    ("Who was the first keeper of the lighthouse?", "Ada Pellow"),
    ("What is the name of the island's ferry?", "Grey Gannet"),
])
def test_answers_questions_about_a_context_in_its_prompt(default_model, question, name):
    ours, tokenizer, chat = default_model
    prompt = chat_ids(tokenizer, chat, f"{CONTEXT}\n\nAnswer the question using the text above.\n{question}")
    answer = tokenizer.decode(m.generate(ours, [prompt], 40, chat.stop_ids)[0], skip_special_tokens=True)
    assert name in answer


def test_end_of_turn_stops_generation(default_model):
    ours, tokenizer, chat = default_model
    assert tokenizer.token_to_id("<|im_end|>") in chat.stop_ids
    new = m.generate(ours, [chat_ids(tokenizer, chat, "What is the capital of France?")], 40, chat.stop_ids)[0]
    assert new[-1] in chat.stop_ids and "Paris" in tokenizer.decode(new)


def test_leak_terms_with_the_real_tokenizer_drop_common_words(default_model):
    import prompt_distill as pd
    _, tokenizer, _ = default_model
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "data", "kelvaran_expedition.txt"), encoding="utf-8") as f:
        terms = pd.leak_terms(f.read(), lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids))
    assert {"Ystrel", "Kelvaran", "Palmqvarn", "Gannet", "1978", "30", "Blue Hour"} <= terms
    assert not {"Blue", "Museum", "June", "Celsius", "Stone"} & terms


def test_distillation_smoke_run_on_the_real_model_lowers_the_loss(default_model_dir, tmp_path, monkeypatch):
    """A few questions and steps of the real pipeline on the default model: the KL loss must fall, and every
    kept pair must state a fact of the document that its question does not."""
    import json
    import sys
    import prompt_distill as pd
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", [
        "prompt_distill.py", "--doc", os.path.join(root, "data", "lake_town.txt"), "--model", default_model_dir,
        "--out", str(out), "--questions-per-passage", "4", "--epochs", "3", "--batch-size", "4",
        "--lr", "2e-3", "--no-guard"])
    assert pd.main() == 0
    report = json.load(open(out / "report.json"))
    assert report["qa_pairs"] >= 8
    assert report["loss_last_epoch"] < 0.8 * report["loss_first_epoch"]
    document = open(os.path.join(root, "data", "lake_town.txt"), encoding="utf-8").read()
    pairs = [json.loads(line) for line in open(out / "qa.jsonl")]
    assert all(p["sentence"] and p["sentence"] in document for p in pairs)  # the sentence each question came from
    words = pd.fact_words(document)
    assert all(pd.stated(p["question"], p["answer"], words) for p in pairs)  # the pairs that teach nothing are gone
    assert sum(p["question"].startswith(("Fill in the blank", "Complete the sentence")) for p in pairs) > 20
