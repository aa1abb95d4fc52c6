"""A pairwise human study of the responses the LLM judge compares, and how far people and judge agree.

    errors        StudyError, the one error of bad study input (names the file, line or field)
    judge_output  what a `pdpo judge` output folder holds: its responses files, its pairs and verdicts
    items         the study's items: the judge's pairs, or every turn two responses files share
    store         the study in one SQLite file: items, annotators (token hashes), side orders, votes
    page_text     the annotation page's words in English and Japanese (the judge's instructions)
    server        the web application annotators vote in (Starlette on uvicorn)
    agreement     majority outcomes, human-judge agreement, Krippendorff's alpha, Fleiss' kappa
    study_report  the report of a study: the paper's Table 3 beside the judge, agreement, a bar plot

`pdpo annotate` (`pdpo_jax.stages.annotate`) is the command line over these.
"""
