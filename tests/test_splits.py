"""Leak-free splits: no test stimulus (or concept, or held-out person) is seen in training."""

from __future__ import annotations

import pytest

from finetune.splits import IndexRow, KeySelect, Split, SplitConfig, make_split


def _rows(classes=4, instances=8, subjects=3, reps=2):
    return [
        IndexRow(f"s{s}_c{k}_i{i}_r{r}", f"synthetic:c{k:02d}:i{i:02d}", f"class_{k}", f"{s:03d}")
        for s in range(1, subjects + 1)
        for k in range(classes)
        for i in range(instances)
        for r in range(reps)
    ]


def _stim(key_rows, keys):
    by_key = {r.key: r for r in key_rows}
    return {by_key[k].stimulus_id for k in keys}, {by_key[k].concept for k in keys}


def test_by_stimulus_holds_images_out_of_every_concept():
    rows = _rows()
    split = make_split(rows, SplitConfig(by="stimulus", test_fraction=0.25))
    train_stim, train_concepts = _stim(rows, split.train_keys)
    test_stim, test_concepts = _stim(rows, split.test_keys)
    assert not train_stim & test_stim
    assert test_stim == set(split.test_stimuli) and len(test_stim) == 4 * 2
    assert train_concepts == test_concepts == {f"class_{k}" for k in range(4)}
    assert len(split.train_keys) + len(split.test_keys) == len(rows)


def test_by_concept_holds_whole_concepts_out():
    rows = _rows()
    split = make_split(rows, SplitConfig(by="concept", test_fraction=0.25))
    _, train_concepts = _stim(rows, split.train_keys)
    _, test_concepts = _stim(rows, split.test_keys)
    assert len(test_concepts) == 1 and not train_concepts & test_concepts


def test_held_out_subjects_never_train_and_split_is_deterministic(tmp_path):
    rows = _rows()
    cfg = SplitConfig(by="stimulus", test_subjects=["002"], seed=3)
    split = make_split(rows, cfg)
    by_key = {r.key: r for r in rows}
    assert {by_key[k].subject for k in split.test_keys} == {"002"}
    assert "002" not in {by_key[k].subject for k in split.train_keys}
    again = Split.load(split.save(tmp_path / "split.json"))
    assert again == make_split(list(reversed(rows)), cfg) == split
    assert (
        make_split(rows, SplitConfig(seed=4)).test_stimuli
        != make_split(rows, SplitConfig()).test_stimuli
    )
    select = KeySelect(split.test_keys)
    assert select({"key": split.test_keys[0]}) and not select({"key": split.train_keys[0]})


@pytest.mark.parametrize(
    "rows, cfg, message",
    [
        ([], SplitConfig(), "no windows with a stimulus id"),
        (_rows(classes=1), SplitConfig(by="concept"), "leaves none for training"),
        (_rows(instances=1), SplitConfig(by="stimulus"), "holds out no stimulus"),
        (_rows(), SplitConfig(test_subjects=["099"]), "not in the shards"),
        (_rows(), SplitConfig(by="image"), "split.by must be one of"),
        (_rows(), SplitConfig(test_fraction=1.0), "test_fraction must be in"),
    ],
)
def test_bad_split_configs_say_what_to_do(rows, cfg, message):
    with pytest.raises(ValueError, match=message):
        make_split(rows, cfg)
