from crystal_lm.text import first_few


def test_first_few_cuts_a_long_list_and_says_how_many_more():
    assert first_few(["a", "b"]) == "a, b"
    assert first_few(list("abcdefg")) == "a, b, c, d, e and 2 more"
    assert first_few(list("abcdefg"), sep="; ") == "a; b; c; d; e; and 2 more"
    assert first_few(list("abcdefghij"), 8) == "a, b, c, d, e, f, g, h and 2 more"
