"""Multi-field formats substitute named fields only: no attribute access, indexing,
conversions or format specs, and values are never interpreted."""
import pytest

from data.formatting import check_format, compile_format, render

FIELDS = ["question", "answer"]


@pytest.mark.parametrize("fmt", ["Q: {question}\nA: {answer}", "{answer}", "{{literal}} {question} {{x}}"])
def test_plain_named_fields_are_accepted(fmt):
    assert check_format(fmt, FIELDS) is None


@pytest.mark.parametrize("fmt, why", [
    ("{question.__class__}", "not a plain field name"),
    ("{question.__class__.__init__.__globals__}", "not a plain field name"),
    ("{question[0]}", "not a plain field name"),
    ("{0}", "positional"),
    ("{}", "positional"),
    ("{question!r}", "conversion"),
    ("{question:>10}", "format spec"),
    ("{question:{answer}}", "format spec"),
    ("{title}", "not one of fields"),
    ("Q: {question", "malformed"),
    ("}", "malformed"),
    ("no placeholders", "uses none"),
])
def test_unsafe_or_wrong_formats_are_rejected_with_a_reason(fmt, why):
    problem = check_format(fmt, FIELDS)
    assert problem is not None and why in problem
    with pytest.raises(ValueError):
        compile_format(fmt, FIELDS)


def test_values_are_inserted_verbatim_never_formatted():
    template = compile_format("Q: {question}\nA: {answer}", FIELDS)
    text, missing = render(template, {"question": " What is {answer.__class__}? ", "answer": "{0} braces"})
    assert missing is None
    assert text == "Q: What is {answer.__class__}?\nA: {0} braces"


@pytest.mark.parametrize("record", [{"question": "q"}, {"question": "q", "answer": None},
                                    {"question": "q", "answer": "  "}, {"question": "q", "answer": {"a": 1}}])
def test_a_missing_or_empty_field_is_reported(record):
    text, missing = render(compile_format("{question} {answer}", FIELDS), record)
    assert text is None and missing == "answer"
