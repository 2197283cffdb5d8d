"""FIM as Crystal applied it, on real packed code samples (crystal-spec §3.3)."""

from __future__ import annotations

import numpy as np

from crystal_lm.data.fim import apply_fim, permute_segment
from crystal_lm.data.loader import StageData
from crystal_lm.data.mixture import _rng


def _segments(ids: list[int], eos: int) -> list[list[int]]:
    out, cur = [], []
    for t in ids:
        if t == eos:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    return [*out, cur]


def _undo(segment: list[int], tok) -> str:
    """Reassemble the original text of one FIM'd segment from its PSM or SPM form."""
    pre, mid, suf = tok.fim_prefix_id, tok.fim_middle_id, tok.fim_suffix_id
    assert segment[0] == pre
    if segment[1] == suf:  # SPM: PRE SUF suffix MID prefix+middle
        m = segment.index(mid)
        return tok.decode(segment[m + 1 :]) + tok.decode(segment[2:m])
    s, m = segment.index(suf), segment.index(mid)  # PSM: PRE prefix SUF suffix MID middle
    return tok.decode(segment[1:s]) + tok.decode(segment[m + 1 :]) + tok.decode(segment[s + 1 : m])


def test_every_segment_is_fimmed_and_reassembles(prepared):
    recipe, data = prepared
    tok = data.tokenizer
    L = recipe.data.seq_len
    checked = 0
    for i in range(20):
        window = data.train["python"].window(i).tokens[:L]
        # Each segment alone: the FIM'd form holds exactly the original text.
        rng = np.random.default_rng(i)
        expected = []
        segments = _segments(window.tolist(), tok.eos_id)
        for k, seg in enumerate(segments):
            if seg:
                permuted, fimmed = permute_segment(np.asarray(seg), tok, rng, 1.0, 0.5)
                assert fimmed and _undo(permuted.tolist(), tok) == tok.decode(seg)
                expected += permuted.tolist()
                checked += 1
                if k < len(segments) - 1:
                    expected.append(tok.eos_id)
        # The whole sample: the same draws, joined with EOS, cut or padded to L.
        r = apply_fim(window, tok, np.random.default_rng(i), rate=1.0, spm_rate=0.5)
        assert len(r.input_ids) == L == len(r.labels) == len(r.loss_mask)
        pad = r.input_ids == tok.fim_pad_id
        assert r.input_ids[~pad].tolist() == expected[:L]
        assert r.labels[:-1].tolist() == r.input_ids[1:].tolist() and r.labels[-1] == tok.eos_id
        assert (r.loss_mask[pad] == 0).all() and (r.loss_mask[~pad] == 1).all()
    assert checked >= 20


def test_short_sample_is_padded_with_fim_pad(prepared):
    _, data = prepared
    tok = data.tokenizer
    ids = np.asarray([tok.bos_id, *tok.encode("x = 1\n"), tok.eos_id, tok.bos_id, *tok.encode("y")])
    r = apply_fim(np.concatenate([ids, np.full(30, tok.eos_id)]), tok, np.random.default_rng(0), 1.0, 0.5)
    assert r.input_ids[-5:].tolist() == [tok.fim_pad_id] * 5 and r.loss_mask[-5:].sum() == 0
    # Consecutive EOS are empty segments and lose their EOS (as in Crystal's pipeline).
    assert r.input_ids.tolist().count(tok.eos_id) <= 2


def test_rate_zero_leaves_tokens_alone(prepared):
    recipe, data = prepared
    window = data.train["python"].window(3).tokens[: recipe.data.seq_len]
    r = apply_fim(window, data.tokenizer, np.random.default_rng(0), rate=0.0, spm_rate=0.5)
    assert r.input_ids.tolist() == window.tolist() and r.n_fim_segments == 0


def test_spm_share_and_determinism(prepared):
    recipe, data = prepared
    tok = data.tokenizer
    L = recipe.data.seq_len
    spm = psm = 0
    for i in range(150):
        window = data.train["web"].window(i % len(data.train["web"])).tokens[:L]
        r = apply_fim(window, tok, np.random.default_rng(1000 + i), rate=1.0, spm_rate=0.5)
        again = apply_fim(window, tok, np.random.default_rng(1000 + i), rate=1.0, spm_rate=0.5)
        assert np.array_equal(r.input_ids, again.input_ids)
        ids = r.input_ids.tolist()
        for k, t in enumerate(ids[:-1]):
            if t == tok.fim_prefix_id:
                spm += ids[k + 1] == tok.fim_suffix_id
                psm += ids[k + 1] != tok.fim_suffix_id
    assert spm + psm >= 150
    assert 0.35 < spm / (spm + psm) < 0.65


def test_stage_fims_only_code_at_the_stage_rate(prepared):
    recipe, data = prepared
    stage2 = StageData(recipe, data, 1)  # FIM 0.9 on code
    assert stage2.fim_sources == {"python", "web"}
    assert StageData(recipe, data, 0).fim_sources == set()
    tok = data.tokenizer
    for g in range(40):
        ids, _, _, source, _ = stage2.sample(g)
        if source in ("prose", "technical"):
            assert tok.fim_prefix_id not in ids.tolist()
    # Deterministic per global sample index, whatever was drawn before.
    a = stage2.sample(17)
    b = StageData(recipe, data, 1).sample(17)
    assert all(np.array_equal(x, y) for x, y in zip(a[:3], b[:3], strict=True))
    assert _rng(1, 1, "fim", 17).random() == _rng(1, 1, "fim", 17).random()
