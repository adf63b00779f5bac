"""Agreement between annotators: Cohen's kappa per pair, Fleiss' kappa per dataset, and how far
corrections moved from the machine's suggestion (edit distance).
"""
from __future__ import annotations

from collections import Counter, defaultdict
from itertools import combinations

from sqlalchemy import select

from annotation.workflow.records import dataset_row
from db.models import Response, Sample, User
from db.session import session_scope


def cohen_kappa(a: list[str], b: list[str]) -> float | None:
    """Cohen's kappa of two raters' labels on the same items (None without items)."""
    if not a or len(a) != len(b):
        return None
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b)) / n
    count_a, count_b = Counter(a), Counter(b)
    chance = sum(count_a[c] * count_b[c] for c in count_a) / (n * n)
    if chance == 1.0:  # both raters used one and the same label throughout
        return 1.0 if observed == 1.0 else None
    return (observed - chance) / (1 - chance)


def fleiss_kappa(items: list[Counter]) -> float | None:
    """Fleiss' kappa from per-item label counts; items may have different numbers of raters."""
    items = [c for c in items if sum(c.values()) >= 2]
    if not items:
        return None
    agreement = []
    totals: Counter = Counter()
    for counts in items:
        n = sum(counts.values())
        agreement.append((sum(v * v for v in counts.values()) - n) / (n * (n - 1)))
        totals.update(counts)
    p_bar = sum(agreement) / len(agreement)
    ratings = sum(totals.values())
    p_chance = sum((v / ratings) ** 2 for v in totals.values())
    if p_chance == 1.0:
        return 1.0 if p_bar == 1.0 else None
    return (p_bar - p_chance) / (1 - p_chance)


def edit_distance(a: str, b: str) -> float:
    """Word-level Levenshtein distance divided by the longer text's length (0 same, 1 disjoint)."""
    x, y = (a or "").lower().split(), (b or "").lower().split()
    if not x and not y:
        return 0.0
    previous = list(range(len(y) + 1))
    for i, word in enumerate(x, 1):
        current = [i]
        for j, other in enumerate(y, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1,
                               previous[j - 1] + (word != other)))
        previous = current
    return previous[-1] / max(len(x), len(y))


def agreement(dataset: str | int, url: str | None = None) -> dict:
    """Inter-annotator agreement on submitted corrections of records with 2+ annotators."""
    with session_scope(url) as session:
        ds = dataset_row(session, dataset)
        rows = session.execute(
            select(Response.sample_id, User.name, Response.label, Response.explanation,
                   Sample.label)
            .join(User, User.id == Response.user_id)
            .join(Sample, Sample.id == Response.sample_id)
            .where(Sample.dataset_id == ds.id, Response.status == "submitted")
            .order_by(Response.sample_id, User.name)).all()
    by_item: dict[int, dict[str, tuple]] = defaultdict(dict)
    truth_hits: dict[str, list[bool]] = defaultdict(list)
    for sample_id, name, label, explanation, truth in rows:
        by_item[sample_id][name] = (label, explanation)
        if truth:
            truth_hits[name].append(label == truth)
    shared = {sid: raters for sid, raters in by_item.items() if len(raters) >= 2}
    pairs: dict[tuple[str, str], tuple[list, list]] = defaultdict(lambda: ([], []))
    distances = []
    for raters in shared.values():
        for (n1, (l1, e1)), (n2, (l2, e2)) in combinations(sorted(raters.items()), 2):
            pairs[(n1, n2)][0].append(l1)
            pairs[(n1, n2)][1].append(l2)
            distances.append(edit_distance(e1, e2))
    cohen = {f"{a}~{b}": {"kappa": cohen_kappa(la, lb), "items": len(la)}
             for (a, b), (la, lb) in sorted(pairs.items())}
    kappas = [v["kappa"] for v in cohen.values() if v["kappa"] is not None]
    all_hits = [hit for hits in truth_hits.values() for hit in hits]
    return {"dataset": ds.name, "items": len(shared),
            "raters": len({n for raters in shared.values() for n in raters}),
            "fleiss_kappa": fleiss_kappa([Counter(label for label, _ in raters.values())
                                          for raters in shared.values()]),
            "cohen_kappa": cohen,
            "mean_cohen_kappa": sum(kappas) / len(kappas) if kappas else None,
            "explanation_distance": sum(distances) / len(distances) if distances else None,
            "ground_truth_agreement": {
                **{name: sum(h) / len(h) for name, h in sorted(truth_hits.items())},
                "all": sum(all_hits) / len(all_hits) if all_hits else None}}
