"""Shared fixtures."""
from pathlib import Path

import pytest

MODELS = Path(__file__).resolve().parent / "stanza_models"


@pytest.fixture(scope="session")
def small_nlp():
    """The pipeline's Stanza Pipeline on the small test models (pretokenized, CPU), with every speedup put back
    on afterwards (tests switch them off to compare with Stanza's own code)."""
    from pipeline.arclabels import use_arc_labels
    from pipeline.parse import ParseSettings, get_pipeline
    from pipeline.treedecode import use_batched_decoder

    s = ParseSettings(tagger=str(MODELS / "en_ewt_tagger_small.pt"), parser=str(MODELS / "en_ewt_parser_small.pt"),
                      device="cpu")
    nlp = get_pipeline(s, pretokenized=True)
    yield nlp
    use_batched_decoder(nlp, True)
    use_arc_labels(nlp, True)
