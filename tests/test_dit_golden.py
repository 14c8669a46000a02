"""Replay the golden DiT cases (reference outputs at tiny fp32 configs) with strict key loading."""
import pytest
import torch



def _load(golden, case):
    return golden.dit_model(case)


def _kwargs(golden, case, call):
    data = golden.data(case)
    return {k: (data[v["tensor"]] if isinstance(v, dict) else v) for k, v in call["call"]["kwargs"].items()}


@pytest.mark.parametrize("case", ["dit_t2v", "dit_ti2v"])
def test_dit_matches_golden(golden, case):
    model = _load(golden, case)
    data = golden.data(case)
    calls = golden.case(case)["calls"]
    assert len(calls) >= 1
    for call in calls:
        with torch.no_grad():
            out = model(**_kwargs(golden, case, call))
        ref = data[call["output"]]
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, **golden.tolerance(case))


def test_dit_return_dict_and_mask_row_sum_only(golden):
    """Only mask row sums matter; masked text positions never influence the output."""
    model = _load(golden, "dit_t2v")
    call = golden.case("dit_t2v")["calls"][0]
    kw = _kwargs(golden, "dit_t2v", call)
    with torch.no_grad():
        base = model(**{**kw, "return_dict": True})["x"]
        mask = kw["encoder_attention_mask"]
        row1_len = int(mask[1].sum())
        text = kw["encoder_hidden_states"].clone()
        clip_len = kw["encoder_hidden_states_2"].shape[1]
        text[1, row1_len - clip_len:] += 5.0          # beyond row 1's valid prefix
        perturbed = model(**{**kw, "encoder_hidden_states": text})
    torch.testing.assert_close(perturbed, base, rtol=0, atol=0)
    assert not torch.equal(base[0], base[1])


def test_ti2v_requires_condition(golden):
    model = _load(golden, "dit_ti2v")
    call = golden.case("dit_ti2v")["calls"][0]
    kw = _kwargs(golden, "dit_ti2v", call)
    kw.pop("condition_hidden_states")
    with pytest.raises(ValueError, match="condition_hidden_states"):
        model(**kw)


def test_t2v_rejects_condition(golden):
    model = _load(golden, "dit_t2v")
    kw = _kwargs(golden, "dit_t2v", golden.case("dit_t2v")["calls"][0])
    with pytest.raises(ValueError, match="use_additional_conditions=False"):
        model(**kw, condition_hidden_states=torch.zeros_like(kw["hidden_states"]))
