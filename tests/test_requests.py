"""Edit requests: the readers of every supported format, offset/limit, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest

from modeledit.requests import EditRequest, EditRequestError, load_requests, request_from_record

ROME = {
    "case_id": 7,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "subject": "Danielle Darrieux",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
    },
    "paraphrase_prompts": ["Where Danielle Darrieux is from, people speak", "Danielle Darrieux speaks"],
    "neighborhood_prompts": ["Michel Rocard is a native speaker of", "The mother tongue of Jean Gabin is"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}

FLAT = {
    "case_id": 4,
    "prompt": "What is the twin city of Lyon? It is",
    "target_new": "Manila",
    "subject": "Lyon",
    "ground_truth": "Beirut",
    "rephrase_prompt": "People in Lyon's twin city speak the language of",
    "locality_prompt": "The twin city of Trieste is",
    "locality_ground_truth": "Beirut",
}

ZSRE = {
    "subject": "Watts Humphrey",
    "src": "What university did Watts Humphrey attend?",
    "alt": "University of Michigan",
    "answers": ["Illinois Institute of Technology", "IIT"],
    "rephrase": "What university did Watts Humphrey take part in?",
    "loc": "nq question: who played desmond doss father in hacksaw ridge",
    "loc_ans": "Hugo Weaving",
}

PLAIN = {
    "prompt": "The capital of France is", "target_new": "Rome", "subject": "France", "target_true": "Paris"
}


def write_json(tmp_path, records, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def write_jsonl(tmp_path, records, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(EditRequestError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, f"error message is not one line: {message!r}"
    return message


# -- readers: field mapping ----------------------------------------------------------------------------------

@pytest.mark.parametrize("writer", [write_json, write_jsonl])
def test_rome_counterfact_fields(tmp_path, writer):
    (r,) = load_requests(writer(tmp_path, [ROME]))
    assert r == EditRequest(
        prompt="The mother tongue of {} is",
        target_new="English",
        subject="Danielle Darrieux",
        target_true="French",
        paraphrase_prompts=ROME["paraphrase_prompts"],
        neighborhood_prompts=ROME["neighborhood_prompts"],
        neighborhood_answers=[],
        generation_prompts=ROME["generation_prompts"],
        case_id=7,
    )
    assert r.text == "The mother tongue of Danielle Darrieux is"
    assert r.template == "The mother tongue of {} is"
    assert r.neighborhood() == [
        ("Michel Rocard is a native speaker of", "French"),
        ("The mother tongue of Jean Gabin is", "French"),
    ]


@pytest.mark.parametrize("writer", [write_json, write_jsonl])
def test_flattened_counterfact_fields(tmp_path, writer):
    (r,) = load_requests(writer(tmp_path, [FLAT]))
    assert r == EditRequest(
        prompt="What is the twin city of Lyon? It is",
        target_new="Manila",
        subject="Lyon",
        target_true="Beirut",
        paraphrase_prompts=["People in Lyon's twin city speak the language of"],
        neighborhood_prompts=["The twin city of Trieste is"],
        neighborhood_answers=["Beirut"],
        generation_prompts=[],
        case_id=4,
    )
    assert r.template == "What is the twin city of {}? It is"
    assert r.text == FLAT["prompt"]


@pytest.mark.parametrize("writer", [write_json, write_jsonl])
def test_zsre_fields(tmp_path, writer):
    (r,) = load_requests(writer(tmp_path, [ZSRE]))
    assert r == EditRequest(
        prompt="What university did Watts Humphrey attend?",
        target_new="University of Michigan",
        subject="Watts Humphrey",
        target_true="Illinois Institute of Technology",
        paraphrase_prompts=["What university did Watts Humphrey take part in?"],
        neighborhood_prompts=["nq question: who played desmond doss father in hacksaw ridge"],
        neighborhood_answers=["Hugo Weaving"],
        generation_prompts=[],
        case_id=0,  # no case_id in zsRE: the record's index
    )
    assert r.neighborhood() == [(ZSRE["loc"], "Hugo Weaving")]


@pytest.mark.parametrize("writer", [write_json, write_jsonl])
def test_edit_request_records_round_trip(tmp_path, writer):
    full = EditRequest(
        prompt="The capital of {} is",
        target_new="Rome",
        subject="France",
        target_true="Paris",
        paraphrase_prompts=["France's capital is"],
        neighborhood_prompts=["The capital of Germany is"],
        neighborhood_answers=["Berlin"],
        generation_prompts=["France is a country whose capital"],
        case_id="fr-1",
    )
    assert full.to_dict()["case_id"] == "fr-1"
    loaded = load_requests(writer(tmp_path, [PLAIN, full.to_dict()]))
    assert loaded[0] == EditRequest(
        prompt="The capital of France is", target_new="Rome", subject="France", target_true="Paris", case_id=0
    )
    assert loaded[1] == full


def test_mixed_formats_in_one_file(tmp_path):
    loaded = load_requests(write_jsonl(tmp_path, [ROME, FLAT, ZSRE, PLAIN]))
    assert [r.target_new for r in loaded] == ["English", "Manila", "University of Michigan", "Rome"]
    assert [r.case_id for r in loaded] == [7, 4, 2, 3]


def test_single_object_file(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(FLAT, indent=2), encoding="utf-8")
    (r,) = load_requests(path)
    assert r.case_id == 4 and r.target_new == "Manila"


def test_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text("\n" + json.dumps(PLAIN) + "\n\n   \n" + json.dumps(FLAT) + "\n", encoding="utf-8")
    assert [r.target_new for r in load_requests(path)] == ["Rome", "Manila"]


def test_to_dict_drops_empty_fields():
    r = EditRequest(prompt="p", target_new="t")
    assert r.to_dict() == {"prompt": "p", "target_new": "t"}


# -- offset / limit ------------------------------------------------------------------------------------------

def numbered(n):
    return [{"prompt": f"Fact {i} is", "target_new": f"t{i}"} for i in range(n)]


@pytest.mark.parametrize("writer", [write_json, write_jsonl])
@pytest.mark.parametrize(
    "offset, limit, expected",
    [(0, None, [0, 1, 2, 3, 4]), (2, None, [2, 3, 4]), (0, 2, [0, 1]), (1, 3, [1, 2, 3]), (3, 10, [3, 4]),
     (5, None, []), (0, 0, [])],
)
def test_offset_and_limit(tmp_path, writer, offset, limit, expected):
    loaded = load_requests(writer(tmp_path, numbered(5)), offset=offset, limit=limit)
    assert [r.target_new for r in loaded] == [f"t{i}" for i in expected]
    assert [r.case_id for r in loaded] == expected  # indices in the file, not in the slice


def test_offset_and_limit_only_validate_the_slice(tmp_path):
    records = numbered(4)
    records[0]["target_new"] = " "
    path = write_json(tmp_path, records)
    assert [r.case_id for r in load_requests(path, offset=1)] == [1, 2, 3]
    assert "record 0" in error_of(load_requests, path)


# -- the real development split ------------------------------------------------------------------------------

def test_shared_counterfact_dev(shared_data):
    requests = load_requests(shared_data / "counterfact" / "dev.json")
    assert len(requests) == 2000
    first = requests[0]
    assert first == EditRequest(
        prompt="The mother tongue of Danielle Darrieux is",
        target_new="English",
        subject="Danielle Darrieux",
        target_true="French",
        paraphrase_prompts=["Where Danielle Darrieux is from, people speak the language of"],
        neighborhood_prompts=["Michel Rocard is a native speaker of"],
        neighborhood_answers=["French"],
        case_id=0,
    )
    assert first.template == "The mother tongue of {} is"
    assert requests[-1].case_id == 4353 and requests[-1].target_new == "Dallas"
    assert len({r.case_id for r in requests}) == 2000
    assert all(r.paraphrase_prompts and len(r.neighborhood()) == 1 for r in requests)


def test_shared_counterfact_dev_offset_limit(shared_data):
    path = shared_data / "counterfact" / "dev.json"
    window = load_requests(path, offset=1998, limit=5)
    assert [r.case_id for r in window] == [load_requests(path)[i].case_id for i in (1998, 1999)]


# -- text, template, neighbourhood ---------------------------------------------------------------------------

def test_text_fills_template():
    r = EditRequest(prompt="{} was born in", target_new="Paris", subject="Alan Turing")
    assert r.text == "Alan Turing was born in"
    assert r.template == "{} was born in"


def test_text_of_full_prompt_is_the_prompt():
    assert EditRequest(prompt="Alan Turing was born in", target_new="Paris", subject="Turing").text == (
        "Alan Turing was born in"
    )


def test_template_replaces_last_occurrence():
    r = EditRequest(prompt="Paris, the city of Paris, is in", target_new="Italy", subject="Paris")
    assert r.template == "Paris, the city of {}, is in"
    assert r.template.format(r.subject) == r.prompt


def test_template_needs_subject_in_prompt():
    r = EditRequest(prompt="The capital of France is", target_new="Rome", subject="Spain", case_id=3)
    message = error_of(lambda: r.template)
    assert "record 3" in message and "'subject'" in message and "Spain" in message
    no_subject = EditRequest(prompt="The capital of France is", target_new="Rome")
    assert "'subject'" in error_of(lambda: no_subject.template)


def test_neighborhood_default_answers():
    r = EditRequest(prompt="p", target_new="new", target_true="true", neighborhood_prompts=["a", "b", "c"])
    assert r.neighborhood() == [("a", "true"), ("b", "true"), ("c", "true")]
    assert EditRequest(prompt="p", target_new="n", neighborhood_prompts=["a"]).neighborhood() == [("a", "")]
    given = EditRequest(
        prompt="p", target_new="n", target_true="t",
        neighborhood_prompts=["a", "b"], neighborhood_answers=["x", "y"],
    )
    assert given.neighborhood() == [("a", "x"), ("b", "y")]
    assert EditRequest(prompt="p", target_new="n").neighborhood() == []


# -- validation ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["", "   ", "\t\n"])
@pytest.mark.parametrize(
    "base, where",
    [(FLAT, ("target_new",)), (PLAIN, ("target_new",)), (ZSRE, ("alt",)),
     (ROME, ("requested_rewrite", "target_new"))],
)
def test_empty_target_new(tmp_path, bad, base, where):
    record = json.loads(json.dumps(base))
    node = record
    for key in where[:-1]:
        node = node[key]
    if where[-1] == "target_new" and isinstance(node["target_new"], dict):
        node["target_new"]["str"] = bad
    else:
        node[where[-1]] = bad
    record["case_id"] = "c9"
    message = error_of(load_requests, write_json(tmp_path, [record]))
    assert "record c9" in message and "'target_new'" in message and "non-empty" in message


def test_empty_prompt_and_target_true():
    assert "'prompt'" in error_of(EditRequest(prompt=" ", target_new="x", case_id=1).validate)
    message = error_of(EditRequest(prompt="p", target_new="x", target_true="  ", case_id=1).validate)
    assert "record 1" in message and "'target_true'" in message


def test_request_without_case_id_is_named_request():
    message = error_of(EditRequest(prompt="p", target_new="").validate)
    assert message.startswith("request, field 'target_new':")


@pytest.mark.parametrize(
    "base, path, field",
    [
        (FLAT, ("prompt",), "prompt"),
        (FLAT, ("target_new",), "target_new"),
        (ZSRE, ("alt",), "alt"),
        (ROME, ("requested_rewrite", "subject"), "subject"),
        (ROME, ("requested_rewrite", "prompt"), "prompt"),
        (ROME, ("requested_rewrite", "target_new"), "target_new"),
        (ROME, ("requested_rewrite", "target_true"), "target_true"),
        (ROME, ("requested_rewrite", "target_new", "str"), "target_new"),
    ],
)
def test_missing_field(tmp_path, base, path, field):
    record = json.loads(json.dumps(base))
    node = record
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    record["case_id"] = 41
    message = error_of(load_requests, write_jsonl(tmp_path, [record]))
    assert "record 41" in message and field in message and "missing" in message


def test_missing_field_is_named_by_index_without_case_id(tmp_path):
    record = dict(ZSRE)
    del record["alt"]
    message = error_of(load_requests, write_json(tmp_path, [ZSRE, ZSRE, record]))
    assert "record 2" in message and "'alt'" in message


@pytest.mark.parametrize("writer", [write_json, write_jsonl])
def test_subject_not_in_prompt(tmp_path, writer):
    record = dict(FLAT, subject="Marseille")
    (r,) = load_requests(writer(tmp_path, [record]))  # fine for methods that do not need the subject
    r.validate()
    message = error_of(r.validate, needs_subject=True)
    assert "record 4" in message and "'subject'" in message and "Marseille" in message
    assert "does not occur" in message


def test_needs_subject_without_subject():
    r = EditRequest(prompt="The capital of France is", target_new="Rome", case_id=8)
    r.validate()
    message = error_of(r.validate, needs_subject=True)
    assert "record 8" in message and "'subject'" in message
    blank = EditRequest(prompt="The capital of France is", target_new="Rome", subject="  ", case_id=8)
    assert "'subject'" in error_of(blank.validate, needs_subject=True)


def test_needs_subject_accepts_template_and_contained_subject():
    for prompt in ("The capital of {} is", "The capital of France is"):
        EditRequest(prompt=prompt, target_new="Rome", subject="France").validate(needs_subject=True)


@pytest.mark.parametrize("writer", [write_json, write_jsonl])
def test_template_without_subject(tmp_path, writer):
    record = {"case_id": "tpl", "prompt": "The capital of {} is", "target_new": "Rome"}
    message = error_of(load_requests, writer(tmp_path, [record]))
    assert "record tpl" in message and "'subject'" in message and "{}" in message
    rome = json.loads(json.dumps(ROME))
    rome["requested_rewrite"]["subject"] = ""
    assert "'subject'" in error_of(load_requests, writer(tmp_path, [rome]))


def test_prompt_longer_than_context(tokenizer):
    r = EditRequest(prompt="abcdefgh", target_new="xyz", case_id=5)  # 8 + 1 + 3 characters = 12 tokens
    r.validate(tokenizer=tokenizer, max_length=12)
    message = error_of(r.validate, tokenizer=tokenizer, max_length=11)
    assert "record 5" in message and "'prompt'" in message and "12 tokens" in message and "(11)" in message
    r.validate(max_length=1)  # no tokenizer: no length check
    r.validate(tokenizer=tokenizer)  # no length: no length check


def test_paraphrase_longer_than_context(tokenizer):
    r = EditRequest(prompt="ab", target_new="x", paraphrase_prompts=["short", "a much longer one"], case_id=6)
    r.validate(tokenizer=tokenizer, max_length=len("a much longer one x"))
    message = error_of(r.validate, tokenizer=tokenizer, max_length=10)
    assert "record 6" in message and "'paraphrase_prompts'" in message


def test_template_prompt_length_counts_the_subject(tokenizer):
    r = EditRequest(prompt="{} is", target_new="x", subject="a long subject", case_id=2)
    assert "'prompt'" in error_of(r.validate, tokenizer=tokenizer, max_length=len("{} is x"))
    r.validate(tokenizer=tokenizer, max_length=len("a long subject is x"))


@pytest.mark.parametrize(
    "change, field",
    [
        ({"paraphrase_prompts": "not a list"}, "paraphrase_prompts"),
        ({"paraphrase_prompts": ["ok", ""]}, "paraphrase_prompts"),
        ({"neighborhood_prompts": ["ok", 3]}, "neighborhood_prompts"),
        ({"generation_prompts": [" "]}, "generation_prompts"),
        ({"neighborhood_prompts": ["a", "b"], "neighborhood_answers": ["x"]}, "neighborhood_answers"),
        ({"target_new": 5}, "target_new"),
        ({"prompt": None}, "prompt"),
    ],
)
def test_bad_edit_request_fields(tmp_path, change, field):
    record = dict(PLAIN, case_id=12, **change)
    message = error_of(load_requests, write_json(tmp_path, [record]))
    assert "record 12" in message and f"'{field}'" in message


@pytest.mark.parametrize(
    "record",
    [{"foo": 1}, {"question": "q", "answer": "a"}, {}, {"prompt": "only a prompt"},
     {"target_new": "only a target"}],
)
def test_unknown_record_format(tmp_path, record):
    message = error_of(load_requests, write_json(tmp_path, [PLAIN, record]))
    assert "record 1" in message and "not a CounterFact" in message
    for key in record:
        assert key in message  # the fields it has are listed


def test_unknown_format_uses_case_id():
    assert "record abc" in error_of(request_from_record, {"case_id": "abc", "x": 1}, 9)


def test_unknown_fields(tmp_path):
    record = dict(PLAIN, case_id=3, colour="blue", size=2)
    message = error_of(load_requests, write_jsonl(tmp_path, [record]))
    assert "record 3" in message and "unknown field" in message
    assert "'colour'" in message and "'size'" in message


@pytest.mark.parametrize("value, kind", [(["a"], "list"), ("text", "str"), (5, "int"), (None, "NoneType")])
def test_non_object_record(tmp_path, value, kind):
    message = error_of(load_requests, write_json(tmp_path, [PLAIN, PLAIN, value]))
    assert "record 2" in message and "JSON object" in message and kind in message


def test_non_object_top_level(tmp_path):
    path = tmp_path / "number.json"
    path.write_text("42", encoding="utf-8")
    assert "record 0" in error_of(load_requests, path)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "missing.json"
    message = error_of(load_requests, path)
    assert "cannot read" in message and str(path) in message and "No such file" in message


def test_directory(tmp_path):
    message = error_of(load_requests, tmp_path)
    assert "cannot read" in message and str(tmp_path) in message


def test_non_utf8(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(json.dumps([PLAIN]).replace("France", "Fran\u00e7e").encode("latin-1"))
    message = error_of(load_requests, path)
    assert "cannot read" in message and "UTF-8" in message and str(path) in message


def test_invalid_json_list(tmp_path):
    path = tmp_path / "bad.json"
    text = json.dumps([PLAIN, PLAIN, PLAIN], indent=1)
    lines = text.splitlines()
    broken = next(i for i, line in enumerate(lines) if '"target_new"' in line and i > len(lines) // 2)
    lines[broken] = lines[broken].replace('"target_new":', '"target_new"')
    path.write_text("\n".join(lines), encoding="utf-8")
    message = error_of(load_requests, path)
    assert str(path) in message and "not valid JSON" in message and f"line {broken + 1}" in message


def test_invalid_json_with_leading_blank_line(tmp_path):
    path = tmp_path / "bad.json"
    lines = ["", "[", json.dumps(PLAIN) + ",", json.dumps(PLAIN)[:-1], "]"]  # line 4 lacks its closing brace
    path.write_text("\n".join(lines), encoding="utf-8")
    message = error_of(load_requests, path)
    assert "not valid JSON" in message and "line 5" in message  # the decoder fails at the "]" of line 5


def test_invalid_jsonl_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(PLAIN) + "\n" + json.dumps(FLAT) + "\n{not json}\n" + json.dumps(PLAIN) + "\n")
    message = error_of(load_requests, path)
    assert str(path) in message and "line 3" in message


def test_invalid_first_jsonl_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("{not json}\n" + json.dumps(PLAIN) + "\n")
    message = error_of(load_requests, path)
    assert "not valid JSON" in message and "line 1" in message


@pytest.mark.parametrize("text", ["[]", "", "\n\n  \n", "[ ]\n"])
def test_no_records(tmp_path, text):
    path = tmp_path / "empty.json"
    path.write_text(text, encoding="utf-8")
    message = error_of(load_requests, path)
    assert str(path) in message and "no records" in message


def test_request_from_record_directly():
    r = request_from_record(dict(FLAT, case_id=None), 17)
    assert r.case_id == 17
    assert request_from_record(FLAT, 17).case_id == 4
    with pytest.raises(ValueError):  # EditRequestError is a ValueError
        request_from_record({"prompt": "p", "target_new": ""}, 0)


def test_flattened_target_new_not_a_string(tmp_path):
    message = error_of(load_requests, write_json(tmp_path, [dict(FLAT, target_new={"str": "Manila"})]))
    assert "record 4" in message and "'target_new'" in message and "non-empty string" in message


def test_rome_target_new_not_an_object(tmp_path):
    record = json.loads(json.dumps(ROME))
    record["requested_rewrite"]["target_new"] = "English"
    message = error_of(load_requests, write_json(tmp_path, [record]))
    assert "record 7" in message and "target_new" in message


# -- braces and the model's context, before any model work (issue 36) ---------------------------------------


@pytest.mark.parametrize(
    "prompt",
    [
        "The {} capital of {} is {x}",  # was a KeyError/IndexError traceback from str.format
        "The {} capital of {} is",
        "The {x} is",
        "The set {a, b} of {} has",  # a literal brace pair elsewhere
        "The set {a, b} of France has",
        "{{}} is",
        "The {} is }",
        "The { } is",
    ],
)
def test_braces_only_as_one_subject_field(tmp_path, prompt):
    r = EditRequest(prompt=prompt, subject="France", target_new="x")
    message = error_of(r.validate)
    assert message == (
        f"request, field 'prompt': braces may appear only once, as {{}} for the subject, got {prompt!r}"
    )
    path = write_jsonl(tmp_path, [{"case_id": 7, "prompt": prompt, "subject": "France", "target_new": "x"}])
    assert error_of(load_requests, path).startswith("record 7, field 'prompt': braces may appear only once")


def test_one_template_field_or_none_is_fine():
    for prompt in ("The capital of {} is", "{} is the capital", "The capital of France is"):
        EditRequest(prompt=prompt, subject="France", target_new="x").validate()


def test_neighbourhood_prompts_must_fit_the_context_too(tokenizer):
    r = EditRequest(prompt="ab", target_new="x", neighborhood_prompts=["n" * 20], case_id=3)
    r.validate(tokenizer=tokenizer, max_length=21)  # 20 characters, a space, no answer: 21 tokens
    message = error_of(r.validate, tokenizer=tokenizer, max_length=10)
    assert "record 3, field 'neighborhood_prompts'" in message and "(10)" in message


def test_check_for_model_uses_the_models_context(tokenizer):
    from types import SimpleNamespace

    from modeledit.requests import check_for_model, model_context

    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=16))
    assert model_context(model) == 16 and model_context(SimpleNamespace(config=SimpleNamespace())) is None
    check_for_model([EditRequest(prompt="short", target_new="x")], model, tokenizer)
    long = EditRequest(prompt=" ".join(["word"] * 9000), target_new="x")
    message = error_of(check_for_model, [long], model, tokenizer)
    assert (
        message
        == "request, field 'prompt': is 45001 tokens with its target, longer than the model context (16)"
    )
    message = error_of(
        check_for_model, [], model, tokenizer, prompts=[("--unrelated prompt 1", "y" * 10)], new_tokens=8
    )
    assert (
        message == "--unrelated prompt 1 is 10 tokens and 8 to generate, longer than the model context (16)"
    )
