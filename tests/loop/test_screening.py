from pgkd.data import normalize_text
from pgkd.types import Sample
from pgkd.loop.screening import screen


def test_each_rejection_reason_and_label_normalisation():
    taxonomy = ["card_lost", "Refund"]
    known = {normalize_text("my card is gone")}
    batch = [
        Sample(text="where is my refund", label="  refund "),   # accepted, label spelled as the taxonomy
        Sample(text="new text", label="weather"),              # unknown_label
        Sample(text="   ", label="card_lost"),                 # empty_text
        Sample(text="ab", label="card_lost"),                  # too_short
        Sample(text="x" * 50, label="card_lost"),              # too_long
        Sample(text="My  card is GONE", label="card_lost"),    # duplicate_of_known
        Sample(text="Where is my refund", label="Refund"),     # duplicate_in_batch
        Sample(text="lost my card", label="CARD_LOST"),        # accepted
    ]
    out = screen(batch, taxonomy, known, min_chars=3, max_chars=40)
    assert out.accepted == [Sample(text="where is my refund", label="Refund"),
                            Sample(text="lost my card", label="card_lost")]
    assert out.rejected_by_reason() == {"unknown_label": 1, "empty_text": 1, "too_short": 1, "too_long": 1,
                                        "duplicate_of_known": 1, "duplicate_in_batch": 1}
