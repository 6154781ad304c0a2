"""Language names for Natural-Instructions files: the ISO 639 names upstream's checker
accepts, and a small function-word detector for telling a few languages apart.

    from datagen.export.languages import detect_language, iso_language_names
    detect_language("Le chat est sur la table.")  # "French"
"""

from __future__ import annotations

import re
from functools import cache


@cache


def iso_language_names() -> frozenset[str]:
    """ISO 639-3 reference names, normalised as the upstream checker does ("Malay
    (individual language)" -> "Malay"), so every name we write passes its check."""
    import iso639

    return frozenset(
        language.name.replace("(individual language)", "").replace(" languages", "").strip()
        for language in iso639.ALL_LANGUAGES
    )


# A few very frequent, mostly language-specific function words per language: enough to
# tell these languages apart on a sentence or two without loading any model.
_STOPWORDS: dict[str, frozenset[str]] = {
    "English": frozenset("the and is are of to that it with for this was be you what which on not have from "
                         "they or by at your can given write".split()),
    "French": frozenset("le la les des est et une du que qui dans pour pas sur avec ce il elle je nous vous "
                        "sont au aux mais ou cette".split()),
    "German": frozenset("der die das und ist nicht ein eine zu mit den dem von sie es ich auf für sich auch "
                        "wir wie aber oder werden".split()),
    "Spanish": frozenset("el los las y es en una un que del por para con no se su al lo como más pero muy "
                         "está son".split()),
    "Italian": frozenset("il gli e è di che una un per non con del della sono si ma come anche questo nel "
                         "alla".split()),
    "Portuguese": frozenset("o os as e é um uma que do da dos das em para com não por se mais mas como no na "
                            "são".split()),
    "Dutch": frozenset("de het een en is van niet dat die ik je op te zijn met voor maar ook er wat naar hij "
                       "zij".split()),
}


def detect_language(text: str, default: str = "English") -> str:
    """The language of `text` among a handful, by function-word counts; `default` when
    there is too little evidence (fewer than 3 hits) or English ties for first."""
    words = re.findall(r"[^\W\d_]+", text.lower())
    scores = {name: sum(word in stopwords for word in words) for name, stopwords in _STOPWORDS.items()}
    best = max(scores, key=lambda name: scores[name])
    if scores[best] < 3 or scores[best] == scores["English"]:
        return default
    return best
