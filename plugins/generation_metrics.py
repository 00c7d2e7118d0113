"""Scores of generated answers against reference answers, for ``causal_lm``'s evaluation (not a
plugin itself): exact match, BLEU and chrF (sacrebleu) and ROUGE-1/2/L (rouge-score).

- ``exact_match``: the share of answers equal to their reference after :func:`normalize`.
- ``bleu``, ``chrf``: sacrebleu's corpus-level scores with its default settings (BLEU-4 with
  the ``13a`` tokenizer and exponential brevity penalty; chrF with character 6-grams, beta 2),
  on sacrebleu's 0-100 scale, the scale papers quote.
- ``rouge``: ``rouge1``, ``rouge2`` and ``rougeL``, the mean over answers of rouge-score's
  F-measure (0-1, as Hugging Face ``evaluate`` reports it), with Porter stemming as the
  original ROUGE script's ``-m``.
"""

from collections.abc import Iterable, Sequence

#: The metric names a recipe may list in ``causal_lm.metrics``.
METRICS = ("exact_match", "bleu", "chrf", "rouge")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def normalize(text: str) -> str:
    """Exact match ignores case, surrounding and repeated white space, and a final period."""
    return " ".join(text.split()).casefold().rstrip(".")


def chosen(metrics: Iterable[str] | None, exact_match: bool = True) -> list[str]:
    """The metrics to compute: ``metrics`` (default ``[exact_match]``), without exact match
    when the older ``causal_lm.exact_match: false`` switches it off."""
    names = ["exact_match"] if metrics is None else list(metrics)
    return [m for m in names if exact_match or m != "exact_match"]


def score(names: Iterable[str], predictions: Sequence[str],
          references: Sequence[str]) -> dict[str, float]:
    """``{metric: value}`` of ``predictions`` against ``references`` (strings, one each) for
    each metric of ``names`` (see :data:`METRICS`; ``rouge`` gives three keys)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {}
    out: dict[str, float] = {}
    for name in names:
        if name == "exact_match":
            hits = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references))
            out["exact_match"] = hits / len(predictions)
        elif name in ("bleu", "chrf"):
            import sacrebleu

            corpus = sacrebleu.corpus_bleu if name == "bleu" else sacrebleu.corpus_chrf
            out[name] = float(corpus(predictions, [references]).score)
        elif name == "rouge":
            out.update(rouge(predictions, references))
        else:
            raise ValueError(f"unknown generation metric {name!r}; one of {', '.join(METRICS)}")
    return out


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure over the pairs."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for p, r in zip(predictions, references):
        for kind, s in scorer.score(r, p).items():  # score(target, prediction)
            totals[kind] += s.fmeasure
    return {kind: total / len(predictions) for kind, total in totals.items()}
