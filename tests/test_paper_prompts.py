"""mta.data.paper_prompts against Appendix E of the MTA paper, written out by hand here."""
import re
import string

import pytest

from mta.data import paper_prompts
from mta.data.lamp import get_task


def render(task, items, fields):
    return paper_prompts.render(get_task(task).name, [get_task(task).render_history(it) for it in items], fields)

CASES = {
    "citation": (
        [{"title": "Graph Networks", "citation": "Deep Sets"}],
        {"title": "Sorting Networks Revisited", "option1": "Bitonic Sort", "option2": "Protein Folding"},
    ),
    "movie_tagging": (
        [{"description": "A robot explores Mars.", "tag": "sci-fi"}],
        {"description": "Two friends open a bakery."},
    ),
    "product_rating": (
        [{"text": "Lovely soft blanket.", "score": 5}],
        {"text": "The battery lasts for days."},
    ),
    "news_headline": (
        [{"text": "Bank stocks fell sharply on Monday.", "title": "Markets Slide"},
         {"text": "The rain flooded the valley.", "title": "Valley Floods"}],
        {"text": "New stocks listed in Tokyo."},
    ),
    "scholarly_title": (
        [{"abstract": "Faster sorting on GPUs.", "title": "GPU Sorting"}],
        {"abstract": "We study graph neural networks."},
    ),
}

EXPECTED = {
    "citation": """\
User History:
Paper Title: Graph Networks Citation: Deep Sets

User Instruction:
For an author who has written the paper with the title "Sorting Networks Revisited", which reference is related? \
Just answer with [1] or [2] without explanation.
Reference: [1] - Bitonic Sort [2] - Protein Folding
Answer:""",
    "movie_tagging": """\
User History:
Description: A robot explores Mars. Tag: sci-fi

User Instruction:
Which tag does this movie relate to among the following tags? Just answer with the tag name without further \
explanation.
tags: [sci-fi, based on a book, comedy, action, twist ending, dystopia, dark comedy, classic, psychology, fantasy, \
romance, thought-provoking, social commentary, violence, true story]
description: Two friends open a bakery.
Tag:""",
    "product_rating": """\
User History:
Review: Lovely soft blanket. Score: 5

User Instruction:
What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 without further \
explanation.
review: The battery lasts for days.
Score:""",
    "news_headline": """\
User History:
Article: Bank stocks fell sharply on Monday. Headline: Markets Slide

Article: The rain flooded the valley. Headline: Valley Floods

User Instruction:
Generate a headline for the following article.
Article: New stocks listed in Tokyo.
Headline:""",
    "scholarly_title": """\
User History:
abstract: Faster sorting on GPUs. title: GPU Sorting

User Instruction:
Generate a title for the following abstract of a paper.
Abstract: We study graph neural networks.
Title:""",
}


@pytest.mark.parametrize("task", list(CASES))
def test_render_matches_appendix_e(task):
    history, query = CASES[task]
    assert render(task, history, query) == EXPECTED[task]


@pytest.mark.parametrize("task", list(CASES))
def test_every_placeholder_filled(task):
    history, query = CASES[task]
    out = render(task, history, query)
    assert not re.search(r"\{[^{}]*\}", out)
    fields = {f for _, f, _, _ in string.Formatter().parse(paper_prompts.TEMPLATES[task]) if f}
    assert fields == {"history"} | set(query)
    for value in query.values():
        assert value in out
    for item in history:
        for value in item.values():
            assert str(value) in out


def test_every_task_has_a_template():
    assert set(paper_prompts.TEMPLATES) == set(CASES)


@pytest.mark.parametrize("task", list(CASES))
def test_the_pipeline_renders_appendix_e_with_prompt_style_paper(task):
    """What stage 3 sends with `prompt_style=paper`: Appendix E over the retrieved item, string for string,
    and the instruction alone for the prompt without history."""
    from mta.data.lamp import Query, instruction_only, query_prompt

    history, fields = CASES[task]
    query = Query("q", get_task(task).question.format(**fields), "gold")
    one = EXPECTED[task] if len(history) == 1 else render(task, history[:1], fields)
    assert query_prompt(task, history[:1], query, k=1, style="paper") == one
    assert instruction_only(task, query, style="paper") == one.split("User Instruction:\n", 1)[1]


def test_alias_extra_fields_and_braces_in_text():
    history, query = CASES["news_headline"]
    assert render("LaMP-4", history, {**query, "question": "ignored"}) == EXPECTED["news_headline"]
    out = render("news_headline", [{"text": "a {b} c", "title": "{t}"}], {"text": "x {y}"})
    assert "Article: a {b} c Headline: {t}" in out and out.endswith("Article: x {y}\nHeadline:")


def test_empty_history():
    assert render("scholarly_title", [], {"abstract": "A."}) == (
        "User History:\n\n\nUser Instruction:\nGenerate a title for the following abstract of a paper.\n"
        "Abstract: A.\nTitle:")


def test_missing_field_and_unknown_task():
    with pytest.raises(ValueError, match="citation: missing field 'option2'"):
        render("citation", [], {"title": "T", "option1": "A"})
    with pytest.raises(ValueError, match="unknown task"):
        paper_prompts.render("email_subject", [], {})
