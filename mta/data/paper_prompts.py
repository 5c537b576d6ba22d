"""The prompt templates of the MTA paper's Appendix E, written out as the paper prints them.

They are kept apart from the prompts the pipeline uses. mta.data.lamp builds those as the authors'
code does, with "### " headers and different gaps and instruction wording.

Appendix E shows each prompt as "User History:", {USER HISTORY}, a blank line, "User Instruction:"
and the instruction lines. Its placeholders map to our field names as follows:
    {USER HISTORY}                              -> {history} (the rendered items, see below)
    LaMP-1 {QUERY PAPER TITLE}, {OPTION 1/2}    -> {title}, {option1}, {option2}
    LaMP-2 {QUERY MOVIE DESCRIPTION}            -> {description}
    LaMP-3 {QUERY REVIEW}, LaMP-4 {QUERY ARTICLE} -> {text}
    LaMP-5 {QUERY ABSTRACT}                     -> {abstract}
These are the query field names that mta.data.lamp.TaskSpec.query_fields returns.

Line breaks follow the ACL version's text, where each template line is its own line. The arXiv
text puts a blank line between every pair of lines, which comes from extracting the PDF. The ACL
text's extra blank line after LaMP-3's "User Instruction:" is read as the same kind of artifact.
The LaMP-1 title is quoted with straight quotes, as in the ACL text.

Appendix E does not show how one history item is written or how several are joined: the caller
passes the items rendered as the authors' code renders them (mta.data.lamp's TaskSpec.render_history),
and they are joined with a blank line (mta.data.lamp's RAG_SEPARATOR). `--set prompt_style=paper` uses
these templates for every prompt (mta.data.lamp.render_prompt).
"""
from __future__ import annotations

from collections.abc import Sequence

TAGS = ("[sci-fi, based on a book, comedy, action, twist ending, dystopia, dark comedy, classic, psychology, "
        "fantasy, romance, thought-provoking, social commentary, violence, true story]")

TEMPLATES: dict[str, str] = {
    "citation": (
        "User History:\n{history}\n\n"
        "User Instruction:\n"
        'For an author who has written the paper with the title "{title}", which reference is related? '
        "Just answer with [1] or [2] without explanation.\n"
        "Reference: [1] - {option1} [2] - {option2}\n"
        "Answer:"
    ),
    "movie_tagging": (
        "User History:\n{history}\n\n"
        "User Instruction:\n"
        "Which tag does this movie relate to among the following tags? "
        "Just answer with the tag name without further explanation.\n"
        "tags: " + TAGS + "\n"
        "description: {description}\n"
        "Tag:"
    ),
    "product_rating": (
        "User History:\n{history}\n\n"
        "User Instruction:\n"
        "What is the score of the following review on a scale of 1 to 5? "
        "just answer with 1, 2, 3, 4, or 5 without further explanation.\n"
        "review: {text}\n"
        "Score:"
    ),
    "news_headline": (
        "User History:\n{history}\n\n"
        "User Instruction:\n"
        "Generate a headline for the following article.\n"
        "Article: {text}\n"
        "Headline:"
    ),
    "scholarly_title": (
        "User History:\n{history}\n\n"
        "User Instruction:\n"
        "Generate a title for the following abstract of a paper.\n"
        "Abstract: {abstract}\n"
        "Title:"
    ),
}

HISTORY_SEPARATOR = "\n\n"  # between rendered history items; the paper does not say
INSTRUCTION = "User Instruction:\n"


def render(task: str, history: Sequence[str], fields: dict) -> str:
    """Appendix E prompt of `task` (a task directory name) with `history` (rendered items, in order) and
    the query or training item's `fields`. Extra fields are ignored; a missing one raises ValueError."""
    if task not in TEMPLATES:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TEMPLATES)}")
    try:
        return TEMPLATES[task].format(**{**fields, "history": HISTORY_SEPARATOR.join(history)})
    except KeyError as e:
        raise ValueError(f"{task}: missing field {e} in the query fields") from e


def instruction(task: str, fields: dict) -> str:
    """The instruction part alone (after "User Instruction:"), for the prompt without history."""
    prompt = render(task, [], fields)
    return prompt[prompt.index(INSTRUCTION) + len(INSTRUCTION):]
