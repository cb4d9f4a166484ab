"""The one did-you-mean (options.suggest), used by pipelines, options, registries and AMCT files."""
from amct_pipeline.options import suggest


def test_closest_spelling():
    assert suggest("fuse_bm", ["fuse_bn", "match_layers"]) == "did you mean 'fuse_bn'?"


def test_abbreviation_of_a_choice():
    assert suggest("arq", ["arq_quantize", "nuq"]) == "did you mean 'arq_quantize'?"
    assert suggest("ar", ["arq_quantize"]) == ""          # too short to be an abbreviation


def test_nothing_close_and_non_string_choices():
    assert suggest("zzz", ["fuse_bn"]) == ""
    assert suggest(8, [7, 16]) == ""
    assert suggest("batch_nm", {"batch_num": 1}) == "did you mean 'batch_num'?"
