"""The built-in corpora: read from the Python installation, deterministic, documented, two domains."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_widgets.data.corpora import (
    _is_code_module,
    corpus_for_role,
    get_corpus_info,
    list_corpora,
    load_corpus,
    read_instructions,
)


def test_two_corpora_with_roles_and_licence() -> None:
    infos = {info.name: info for info in list_corpora()}
    assert set(infos) == {"stdlib-code", "python-docs", "python-instruct"}
    assert infos["stdlib-code"].role == "pretrain"
    assert infos["python-docs"].role == "finetune"
    assert infos["python-instruct"].role == "instruct"
    for info in infos.values():
        assert "Python Software Foundation" in info.licence
        assert info.description and info.source
    assert corpus_for_role("pretrain") == "stdlib-code"
    assert corpus_for_role("finetune") == "python-docs"
    assert corpus_for_role("instruct") == "python-instruct"


@pytest.mark.parametrize("name", ["stdlib-code", "python-docs"])
def test_read_is_deterministic_and_returns_a_fresh_list(name: str) -> None:
    first = load_corpus(name)
    assert len(first) > 50
    assert all(isinstance(doc, str) and doc.strip() for doc in first)
    first.append("mutated")
    assert load_corpus(name) == first[:-1]


def test_code_corpus_is_code_without_tests_or_build_data() -> None:
    docs = load_corpus("stdlib-code")
    text = "\n".join(docs)
    assert len(text) > 1_000_000
    assert text.count("\ndef ") > 1000
    assert "class ArgumentParser(" in text  # argparse.py is in, in file-name order before base64.py
    assert text.index("class ArgumentParser(") < text.index("def b64encode(")
    assert "build_time_vars = {" not in text  # _sysconfigdata_*.py: machine-specific generated data
    assert "Gur Mra bs Clguba" not in text  # this.py: ROT13 text, not code
    assert len(docs) == len({doc[:200] for doc in docs})
    for name, kept in [
        ("argparse.py", True),
        ("test_x.py", False),
        ("_test_y.py", False),
        ("this.py", False),
    ]:
        assert _is_code_module(Path(name)) is kept, name


def test_docs_corpus_is_prose_from_pydoc_topics() -> None:
    from pydoc_data.topics import topics

    docs = load_corpus("python-docs")
    assert docs == [topics[key].strip() for key in sorted(topics) if topics[key].strip()]
    text = "\n".join(docs)
    assert "statement" in text and "The " in text
    # prose, not code: far fewer definitions per character than the stdlib source
    code = "\n".join(load_corpus("stdlib-code"))
    assert text.count("def ") / len(text) < 0.2 * code.count("def ") / len(code)


def test_unknown_names_and_roles_are_explained() -> None:
    with pytest.raises(ValueError, match=r"unknown corpus 'wiki'.*stdlib-code, python-docs, python-instruct"):
        load_corpus("wiki")
    with pytest.raises(ValueError, match="unknown corpus"):
        get_corpus_info("")
    with pytest.raises(ValueError, match=r"unknown corpus role 'train'.*'pretrain'.*'finetune'.*'instruct'"):
        corpus_for_role("train")
    with pytest.raises(ValueError, match=r"instruction set.*read_instructions\('python-instruct', 'train'\)"):
        load_corpus("python-instruct")
    with pytest.raises(ValueError, match=r"'python-docs' is a text corpus"):
        read_instructions("python-docs")
    with pytest.raises(ValueError, match="split must be 'train' or 'validation'"):
        read_instructions("python-instruct", "test")


def test_instruction_set_is_real_deterministic_and_split_without_leaks() -> None:
    from pydoc_data.topics import topics

    train = read_instructions("python-instruct", "train")
    val = read_instructions("python-instruct", "validation")
    assert len(train) > 300 and 30 <= len(val) <= 0.2 * len(train)
    assert read_instructions("python-instruct", "train") == train  # deterministic
    train[0]["messages"][0]["content"] = "mutated"
    assert read_instructions("python-instruct", "train")[0]["messages"][0]["content"] != "mutated"
    answers = lambda rows: {r["messages"][1]["content"] for r in rows}  # noqa: E731
    assert not answers(train) & answers(val)  # no validation answer appears in training
    for rows in (train, val):
        assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows)
        assert all(len(r["messages"][1]["content"]) <= 300 for r in rows)
    questions = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in train + val}
    with_stmt = questions["Explain the `with` statement in Python."]
    assert with_stmt.startswith("The `with` statement is used to wrap the execution of a block")
    assert " ".join(topics["with"].split()).find(with_stmt.replace("`", '"')[:60]) > 0  # Python's own words
    import json as json_module

    summary = " ".join(json_module.dumps.__doc__.strip().split("\n\n")[0].split())
    assert questions["What does `json.dumps(...)` do?"] == summary
    assert any(q.startswith("Explain") for q in map(lambda r: r["messages"][0]["content"], val))
    assert any(q.startswith("What does") for q in map(lambda r: r["messages"][0]["content"], val))
