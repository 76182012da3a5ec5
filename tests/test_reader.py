"""The shard reader: exact partition over ranks x workers, determinism, padding, damage."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds

import shards.reader as reader
from shards.reader import ReaderConfig, ShardReadWarning, build_pipeline, list_shards, make_loader
from shards.sample import collate_eeg, decode_sample

N_SHARDS, PER_SHARD = 8, 10
CHANNELS = (19, 32, 64)


def sample_record(key: str, n_ch: int, n_t: int, seed: int, kind: str = "window") -> dict:
    """One sample exactly as the builder writes it (see shards.writer.encode_sample)."""
    rng = np.random.default_rng(seed)
    eeg = rng.normal(0, 20, size=(n_ch, n_t)).astype(np.float16)
    positions = [None if i % 5 == 4 else [0.01 * i, -0.02, 0.08] for i in range(n_ch)]
    meta = {
        "key": key,
        "ch_names": [f"E{i}" for i in range(n_ch)],
        "ch_known": [i % 3 != 2 for i in range(n_ch)],
        "ch_pos": positions,
        "sfreq": 200.0,
        "unit": "uV",
        "n_samples": n_t,
        "provenance": {"dataset": "toy", "subject": "1", "session": "0", "run": "0", "file": None},
        "source": "toy",
        "window": {"index": seed, "start_s": 0.0, "kind": kind},
        "label": f"class{seed % 3}" if kind == "trial" else None,
        "stimulus_id": f"img{seed}" if kind == "trial" else None,
        "events": [],
        "extra": {},
    }
    buf = io.BytesIO()
    np.save(buf, eeg, allow_pickle=False)
    return {"__key__": key, "eeg.npy": buf.getvalue(), "json": json.dumps(meta).encode()}


def write_corpus(out: Path) -> dict[str, list[str]]:
    """8 shards x 10 samples, channel counts 19/32/64, the last shard epoched (shorter T)."""
    out.mkdir(parents=True, exist_ok=True)
    keys: dict[str, list[str]] = {}
    for s in range(N_SHARDS):
        name = f"shard-{s:05d}.tar"
        keys[name] = []
        with wds.TarWriter(str(out / name), encoder=False) as tar:
            for i in range(PER_SHARD):
                index = s * PER_SHARD + i
                key = f"toy_s{s}_w{i:03d}"
                n_t, kind = (160, "trial") if s == N_SHARDS - 1 else (200, "window")
                tar.write(sample_record(key, CHANNELS[index % 3], n_t, index, kind))
                keys[name].append(key)
    (out / "sizes.json").write_text(json.dumps({n: len(k) for n, k in keys.items()}))
    (out / "manifest.json").write_text(json.dumps({"shards": sorted(keys)}))
    return keys


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    out = tmp_path_factory.mktemp("corpus")
    return out, write_corpus(out)


def all_keys(keys: dict[str, list[str]]) -> set[str]:
    return {k for ks in keys.values() for k in ks}


def read_keys(batches) -> list[str]:
    return [k for batch in batches for k in batch["key"]]


def cfg(**kw) -> ReaderConfig:
    base = {"batch_size": 4, "num_workers": 0, "shuffle_buffer": 16, "shuffle_initial": 4}
    return ReaderConfig(**{**base, **kw})


def test_ranks_and_workers_partition_the_corpus(corpus, monkeypatch):
    out, keys = corpus
    # Real DataLoaders: 2 nodes x 2 workers.
    per_rank = []
    for rank in (0, 1):
        loader = make_loader(out, cfg(num_workers=2), rank=rank, world_size=2)
        batches = list(loader)
        seen = read_keys(batches)
        assert len(seen) == len(set(seen)), "a sample was read twice on one rank"
        per_rank.append(set(seen))
        # A shard is read whole by one rank.
        shards = {Path(s).name for b in batches for s in b["shard"]}
        assert len(shards) == N_SHARDS // 2
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == all_keys(keys)

    # Each (rank, worker) stream on its own, by faking the worker info in this process.
    streams = {}
    for rank in (0, 1):
        for worker in (0, 1):
            info = SimpleNamespace(id=worker, num_workers=2)
            monkeypatch.setattr(reader, "get_worker_info", lambda info=info: info)
            pipe = build_pipeline(out, cfg(), rank=rank, world_size=2)
            streams[rank, worker] = read_keys(pipe)
    sets = {k: set(v) for k, v in streams.items()}
    names = list(sets)
    for i, a in enumerate(names):
        assert len(streams[a]) == len(sets[a])
        assert sets[a], f"{a} read nothing"
        for b in names[i + 1 :]:
            assert not sets[a] & sets[b], (a, b)
    assert set().union(*sets.values()) == all_keys(keys)
    assert sum(len(v) for v in streams.values()) == N_SHARDS * PER_SHARD


def test_order_is_a_function_of_seed_and_epoch(corpus):
    out, keys = corpus

    def order(seed=0, epoch=0, **kw):
        return read_keys(build_pipeline(out, cfg(seed=seed, **kw), epoch=epoch))

    first = order()
    assert sorted(first) == sorted(all_keys(keys))
    assert order() == first
    assert order(epoch=1) != first
    assert order(seed=1) != first
    assert sorted(order(epoch=1)) == sorted(first)
    # Shuffling off: sorted shard order, samples in tar order.
    assert order(shuffle=False) == [k for name in sorted(keys) for k in keys[name]]

    # set_epoch reaches persistent workers: epoch 1 of a persistent loader equals a fresh
    # loader started at epoch 1.
    loader = make_loader(out, cfg(num_workers=2, persistent_workers=True))
    epoch0 = read_keys(loader)
    loader.set_epoch(1)
    epoch1 = read_keys(loader)
    fresh = make_loader(out, cfg(num_workers=2), epoch=1)
    assert epoch1 == read_keys(fresh)
    assert epoch0 != epoch1
    assert read_keys(make_loader(out, cfg(num_workers=2))) == epoch0


def test_collate_pads_and_masks():
    shapes = [(19, 200), (64, 200), (32, 160)]
    raws = [sample_record(f"k{i}", c, t, i, "trial") for i, (c, t) in enumerate(shapes)]
    samples = [decode_sample(r) for r in raws]
    batch = collate_eeg(samples)
    n_b, c_max, t_max = 3, 64, 200
    assert batch["eeg"].shape == (n_b, c_max, t_max) and batch["eeg"].dtype == torch.float32
    assert batch["channel_mask"].shape == (n_b, c_max) and batch["channel_mask"].dtype == torch.bool
    assert batch["time_mask"].shape == (n_b, t_max) and batch["time_mask"].dtype == torch.bool
    assert batch["ch_pos"].shape == (n_b, c_max, 3) and batch["ch_pos"].dtype == torch.float32
    assert batch["pos_known"].shape == (n_b, c_max) and batch["pos_known"].dtype == torch.bool
    assert batch["sfreq"].tolist() == [200.0] * n_b and batch["sfreq"].dtype == torch.float32
    assert batch["key"] == ["k0", "k1", "k2"]
    assert batch["label"] == ["class0", "class1", "class2"]
    assert batch["stimulus_id"] == ["img0", "img1", "img2"]
    assert [len(n) for n in batch["ch_names"]] == [19, 64, 32]
    assert [m["key"] for m in batch["meta"]] == ["k0", "k1", "k2"]
    for b, ((n_ch, n_t), raw) in enumerate(zip(shapes, raws, strict=True)):
        assert batch["channel_mask"][b].sum() == n_ch and batch["channel_mask"][b, :n_ch].all()
        assert batch["time_mask"][b].sum() == n_t and batch["time_mask"][b, :n_t].all()
        expect = np.load(io.BytesIO(raw["eeg.npy"])).astype(np.float32)
        np.testing.assert_array_equal(batch["eeg"][b, :n_ch, :n_t].numpy(), expect)
        assert not batch["eeg"][b, n_ch:].any() and not batch["eeg"][b, :, n_t:].any()
        meta = json.loads(raw["json"])
        known = [p is not None for p in meta["ch_pos"]]
        assert batch["pos_known"][b, :n_ch].tolist() == known
        assert not batch["pos_known"][b, n_ch:].any() and not batch["ch_known"][b, n_ch:].any()
        assert batch["ch_known"][b, :n_ch].tolist() == meta["ch_known"]
        for c, pos in enumerate(meta["ch_pos"]):
            np.testing.assert_allclose(batch["ch_pos"][b, c].numpy(), pos or [0, 0, 0])
        assert not batch["ch_pos"][b, n_ch:].any()


def test_damaged_shards_and_samples_are_skipped_with_a_warning(corpus, tmp_path):
    src, keys = corpus
    out = tmp_path / "damaged"
    shutil.copytree(src, out)
    truncated, garbage, cut = "shard-00002.tar", "shard-00005.tar", "shard-00006.tar"
    data = (out / truncated).read_bytes()
    (out / truncated).write_bytes(data[: len(data) // 2])  # mid-member: tar raises
    (out / garbage).write_bytes(b"this is not a tar file\n" * 400)
    # Cut exactly before a member header: tar ends quietly, only sizes.json can tell.
    with tarfile.open(out / cut) as tar:
        offset = tar.getmembers()[2 * 5].offset  # two members per sample: 5 samples kept
    data = (out / cut).read_bytes()
    (out / cut).write_bytes(data[:offset])
    # A shard with undecodable samples among good ones.
    bad_samples = out / "shard-00099.tar"
    good = sample_record("toy_x_good", 19, 200, 1)
    bad_json = {**sample_record("toy_x_badjson", 19, 200, 2), "json": b"{not json"}
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    bad_npy = {**sample_record("toy_x_pickle", 19, 200, 3), "eeg.npy": pickled.getvalue()}
    no_json = {k: v for k, v in sample_record("toy_x_nojson", 19, 200, 4).items() if k != "json"}
    with wds.TarWriter(str(bad_samples), encoder=False) as tar:
        for s in (bad_json, good, bad_npy, no_json):
            tar.write(s)

    shard_paths = [str(out / name) for name in sorted(keys)] + [str(bad_samples)]
    with pytest.warns(ShardReadWarning) as record:
        seen = read_keys(build_pipeline(shard_paths, cfg()))
    messages = [str(w.message) for w in record]
    assert any(truncated in m for m in messages), messages
    assert any(garbage in m for m in messages), messages
    assert any(cut in m and "held 5 sample(s) but sizes.json says 10" in m for m in messages)
    for bad in ("toy_x_badjson", "toy_x_pickle", "toy_x_nojson"):
        assert any(bad in m for m in messages), (bad, messages)

    assert len(seen) == len(set(seen))
    damaged = (truncated, garbage, cut)
    expected = {k for name, ks in keys.items() if name not in damaged for k in ks}
    assert expected | set(keys[cut][:5]) | {"toy_x_good"} <= set(seen)
    assert set(seen) <= all_keys(keys) | {"toy_x_good"}
    assert not set(seen) & set(keys[garbage])


def test_resampled_mode_yields_the_nominal_epoch(corpus):
    out, _ = corpus

    def run(epoch=0, **kw):
        loader = make_loader(out, cfg(resampled=True, batch_size=8, **kw), epoch=epoch)
        return loader, list(loader)

    loader, batches = run()
    assert len(loader) == loader.num_batches == 10  # 80 samples / 8
    assert loader.num_samples == 80
    assert len(batches) == 10 and all(len(b["key"]) == 8 for b in batches)
    keys = read_keys(batches)
    assert read_keys(run()[1]) == keys
    assert read_keys(run(epoch=1)[1]) != keys
    assert read_keys(run(seed=5)[1]) != keys

    # 2 ranks x 2 workers: every rank gets the same, worker-divisible number of batches.
    counts = []
    for rank in (0, 1):
        loader = make_loader(
            out, cfg(resampled=True, batch_size=8, num_workers=2), rank=rank, world_size=2
        )
        assert loader.num_batches == 6  # ceil(80 / 16) = 5, rounded up to 2 workers
        counts.append(len(list(loader)))
    assert counts == [6, 6]


def test_shard_lists(corpus, tmp_path):
    out, keys = corpus
    other = tmp_path / "other"
    other_keys = write_corpus(other)
    both = list_shards([out, other])
    assert [Path(u).name for u in both.urls] == sorted(keys) + sorted(other_keys)
    assert both.num_samples == 2 * N_SHARDS * PER_SHARD
    explicit = list_shards([str(out / "shard-00001.tar"), str(out / "shard-00000.tar")])
    assert [Path(u).name for u in explicit.urls] == ["shard-00001.tar", "shard-00000.tar"]
    assert explicit.num_samples == 2 * PER_SHARD  # from the sizes.json beside them
    brace = list_shards(str(out / "shard-{00000..00003}.tar"))
    assert len(brace.urls) == 4
    loose = tmp_path / "loose.tar"
    shutil.copy(out / "shard-00000.tar", loose)
    assert list_shards(str(loose)).num_samples is None
    with pytest.raises(ValueError, match="samples_per_epoch"):
        make_loader(str(loose), cfg(resampled=True))
    assert make_loader(str(loose), cfg(resampled=True, samples_per_epoch=8)).num_batches == 2


def test_meaningful_errors(corpus, tmp_path):
    out, _ = corpus
    with pytest.raises(ValueError, match="does not exist"):
        list_shards(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="sizes.json"):
        list_shards(empty)
    no_sizes = tmp_path / "no_sizes"
    no_sizes.mkdir()
    shutil.copy(out / "shard-00000.tar", no_sizes)
    with pytest.raises(ValueError, match="has no sizes.json"):
        make_loader(no_sizes)
    (empty / "sizes.json").write_text("{}")
    with pytest.raises(ValueError, match="no shards"):
        build_pipeline(empty)
    (no_sizes / "sizes.json").write_text(json.dumps({"shard-00000.tar": 10, "gone.tar": 3}))
    with pytest.raises(ValueError, match="missing"):
        list_shards(no_sizes)
    with pytest.raises(ValueError, match="no shards given"):
        list_shards([])
    with pytest.raises(ValueError, match="listed twice"):
        list_shards([out, out])
    with pytest.raises(ValueError, match="rank"):
        build_pipeline(out, cfg(), rank=2, world_size=2)
    with pytest.raises(ValueError, match="some rank would get no"):
        build_pipeline(out, cfg(), rank=0, world_size=N_SHARDS + 1)
    with pytest.raises(ValueError, match="batch_size"):
        build_pipeline(out, cfg(batch_size=0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a healthy corpus reads without a single warning
        assert len(read_keys(build_pipeline(out, cfg()))) == N_SHARDS * PER_SHARD


def test_an_unreadable_corpus_stops_resampling(tmp_path):
    # Every shard garbage (a lost mount, say): resampling must raise, not spin forever.
    out = tmp_path / "broken"
    keys = write_corpus(out)
    for name in keys:
        (out / name).write_bytes(b"\0garbage" * 100)
    loader = make_loader(out, cfg(resampled=True))
    with pytest.warns(ShardReadWarning), pytest.raises(RuntimeError, match="in a row"):
        list(loader)


def test_a_corpus_of_unusable_samples_stops_resampling(tmp_path):
    # Shards that read fine but whose every window holds NaN: also raise, not spin.
    out = tmp_path / "nan"
    keys = write_corpus(out)
    for name in keys:
        samples = list(wds.WebDataset(str(out / name), shardshuffle=False))
        with wds.TarWriter(str(out / name), encoder=False) as tar:
            for s in samples:
                eeg = np.load(io.BytesIO(s["eeg.npy"]))
                buf = io.BytesIO()
                np.save(buf, np.full_like(eeg, np.nan), allow_pickle=False)
                tar.write({"__key__": s["__key__"], "eeg.npy": buf.getvalue(), "json": s["json"]})
    loader = make_loader(out, cfg(resampled=True))
    with (
        pytest.warns(ShardReadWarning, match="NaN"),
        pytest.raises(RuntimeError, match="samples in a row could not be used"),
    ):
        list(loader)
