"""The encoder as a braindecode model: its conventions, and a braindecode user's finetuning
of pretrained weights on braindecode's own PhysionetMI windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.braindecode_model import BrainmoeClassifier
from pretrain.encoder import Encoder
from pretrain.encoder_config import get_config

NAMES = ["C3", "C4", "Cz", "Fp1", "O2"]


def chs_info(names=NAMES, sfreq=160.0, montage=True):
    import mne

    info = mne.create_info(list(names), sfreq, "eeg")
    if montage:
        builtin = mne.channels.get_builtin_montages()
        name = "colin27_1005" if "colin27_1005" in builtin else "standard_1005"
        info.set_montage(name, on_missing="ignore")
    return info["chs"]


@pytest.fixture
def tiny_folder(tmp_path):
    torch.manual_seed(123)
    return Encoder(get_config("tiny")).save_pretrained(tmp_path / "tiny")


def test_braindecode_conventions_and_shapes():
    model = BrainmoeClassifier(
        n_outputs=3, chs_info=chs_info(), n_times=480, sfreq=160.0, encoder="tiny"
    )
    assert (model.n_chans, model.n_outputs, model.n_times, model.sfreq) == (5, 3, 480, 160.0)
    assert model.input_window_seconds == 3.0
    assert [ch["ch_name"] for ch in model.chs_info] == NAMES
    x = torch.randn(4, 5, 480) * 20e-6  # volts, as braindecode hands them out
    logits = model(x)
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()
    # regions pooling: 19 10-20 sites + the global mean, 64 wide each (tiny)
    assert model(x, return_features=True)["features"].shape == (4, 20 * 64)
    assert model.get_output_shape() == (1, 3)
    assert "BrainmoeClassifier" in str(model)  # braindecode's torchinfo summary runs
    model.reset_head(7)
    assert model(x).shape == (4, 7) and model.n_outputs == 7
    # from_config rebuilds the same architecture (weights aside)
    twin = BrainmoeClassifier.from_config(model.get_config())
    assert twin.n_chans == 5 and twin.n_outputs == 7 and twin.pooling == "regions"

    mean = BrainmoeClassifier(
        n_outputs=2, chs_info=chs_info(), sfreq=160.0, encoder="tiny", pooling="mean"
    )
    assert mean(x, return_features=True)["features"].shape == (4, 64)


def test_channels_without_identity_are_rejected_before_loading(tmp_path):
    with pytest.raises(ValueError, match="none of the 2 channels"):
        BrainmoeClassifier(
            n_outputs=2,
            chs_info=chs_info(["foo", "bar"], montage=False),
            sfreq=160.0,
            encoder="tiny",
        )
    # an unknown name with a position is placed by its position
    info = chs_info(["C3", "C4"])
    info[1] = {**info[1], "ch_name": "mystery"}
    with pytest.warns(UserWarning, match="neither"):
        model = BrainmoeClassifier(
            n_outputs=2,
            chs_info=info + chs_info(["nowhere"], montage=False),
            sfreq=160.0,
            encoder="tiny",
        )
    assert model.ch_ids[1] == 0 and bool(model.pos_known[1]) and not bool(model.pos_known[2])

    missing = tmp_path / "nothing-here"
    with pytest.raises(ValueError, match="nothing-here: no such folder"):
        BrainmoeClassifier(n_outputs=2, chs_info=chs_info(), sfreq=160.0, encoder=str(missing))
    with pytest.raises(ValueError, match="needs chs_info"):
        BrainmoeClassifier(n_outputs=2, n_chans=5, sfreq=160.0, encoder="tiny")
    with pytest.raises(ValueError, match="sfreq"):
        BrainmoeClassifier(n_outputs=2, chs_info=chs_info(), encoder="tiny")
    with pytest.raises(ValueError, match="unit must be"):
        BrainmoeClassifier(n_outputs=2, chs_info=chs_info(), sfreq=160.0, encoder="tiny", unit="nV")
    with pytest.raises(ValueError, match="shorter than one encoder patch"):
        BrainmoeClassifier(
            n_outputs=2, chs_info=chs_info(), sfreq=160.0, encoder="tiny", n_times=80
        )
    with pytest.raises(ValueError, match="needs encoder"):
        BrainmoeClassifier(n_outputs=2, chs_info=chs_info(), sfreq=160.0)
    model = BrainmoeClassifier(n_outputs=2, chs_info=chs_info(), sfreq=160.0, encoder="tiny")
    with pytest.raises(ValueError, match="5 channels"):
        model(torch.zeros(2, 4, 480))


def test_units_rates_and_pretrained_weights(tiny_folder):
    folder = tiny_folder
    saved = Encoder.from_pretrained(folder).state_dict()
    kw = dict(n_outputs=2, chs_info=chs_info(), encoder=str(folder))
    volts = BrainmoeClassifier(**kw, sfreq=160.0).eval()
    for name, value in volts.encoder.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0)

    # A smooth signal (< 20 Hz): volts or microvolts, 160 Hz or 200 Hz, the same features.
    def signal(sfreq):
        t = torch.arange(round(3 * sfreq)) / sfreq
        f = torch.tensor([3.0, 7.0, 11.0, 17.0, 5.0])[:, None]
        return (30e-6 * torch.sin(2 * torch.pi * f * t + f))[None]  # [1, C, T] V

    with torch.no_grad():
        ref = volts(signal(160.0), return_features=True)["features"]
        micro = BrainmoeClassifier(**kw, sfreq=160.0, unit="uV").eval()
        micro.final_layer.load_state_dict(volts.final_layer.state_dict())
        torch.testing.assert_close(micro(signal(160.0) * 1e6), volts(signal(160.0)))
        native = BrainmoeClassifier(**kw, sfreq=200.0).eval()
        at_200 = native(signal(200.0), return_features=True)["features"]
        wrong_rate = native(signal(160.0), return_features=True)["features"]
    gap = (at_200 - ref).norm() / ref.norm()
    assert gap < 0.05, gap  # the encoder's own resampling to 200 Hz
    wrong = (wrong_rate - ref).norm() / ref.norm()
    assert wrong > 10 * gap  # so sfreq matters (measured: 0.03 vs 0.88)

    frozen = BrainmoeClassifier(**kw, sfreq=160.0, freeze_encoder=True).train()
    assert not any(p.requires_grad for p in frozen.encoder.parameters())
    assert not frozen.encoder.training and frozen.final_layer.training


@pytest.mark.shared_data
def test_eegclassifier_finetunes_pretrained_encoder_on_moabb_windows(physionet, tiny_folder):
    """The README's braindecode recipe: MOABBDataset -> preprocess -> windows ->
    EEGClassifier(BrainmoeClassifier(encoder=<pretrained folder>)) -> fit, split by run."""
    from braindecode import EEGClassifier
    from braindecode.datasets import BaseConcatDataset, MOABBDataset
    from braindecode.preprocessing import Preprocessor, create_windows_from_events, preprocess
    from skorch.helper import predefined_split

    folder = tiny_folder
    dataset = MOABBDataset("PhysionetMI", subject_ids=[1])
    # imagined left/right fist runs only (the others are fists/feet)
    dataset = BaseConcatDataset(
        [d for d in dataset.datasets if "left_hand" in d.raw.annotations.description]
    )
    preprocess(
        dataset,
        [Preprocessor("pick", picks="eeg"), Preprocessor("filter", l_freq=4.0, h_freq=38.0)],
        n_jobs=1,
    )
    windows = create_windows_from_events(
        dataset,
        trial_start_offset_samples=0,
        trial_stop_offset_samples=0,
        window_size_samples=480,  # 3 s at 160 Hz: the task's 0-3 s after the cue
        window_stride_samples=480,
        on_last_window="drop",
        mapping={"left_hand": 0, "right_hand": 1},
        preload=True,
    )
    runs = windows.split("run")
    assert sorted(runs) == ["0", "1", "2"]  # the three fist runs, as numbered after the filter
    train_set = BaseConcatDataset([*runs["0"].datasets, *runs["1"].datasets])
    valid_set = runs["2"]
    info = windows.datasets[0].raw.info
    assert (len(train_set), len(valid_set)) == (30, 15)
    assert 1e-7 < np.std(train_set[0][0]) < 1e-3  # volts: what unit="V" (default) expects

    torch.manual_seed(0)
    model = BrainmoeClassifier(
        encoder=str(folder),
        n_outputs=2,
        chs_info=info["chs"],
        n_times=480,
        sfreq=info["sfreq"],
    )
    saved = Encoder.from_pretrained(folder).state_dict()
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    for name, value in before.items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0)
    assert model.n_chans == 64 and int((model.ch_ids > 0).sum()) == 64  # every name known

    clf = EEGClassifier(
        model,
        criterion=torch.nn.CrossEntropyLoss,
        optimizer=torch.optim.AdamW,
        optimizer__lr=1e-3,
        train_split=predefined_split(valid_set),
        batch_size=8,
        max_epochs=3,
        device="cpu",
        classes=[0, 1],
        verbose=0,
    )
    clf.fit(train_set, y=None)
    losses = clf.history[:, "train_loss"]
    assert len(losses) == 3 and np.isfinite(losses).all()
    assert losses[-1] < losses[0], losses
    assert np.isfinite(clf.history[:, "valid_loss"]).all()
    proba = clf.predict_proba(valid_set)
    assert proba.shape == (len(valid_set), 2) and np.isfinite(proba).all()
    assert set(np.unique(clf.predict(valid_set))) <= {0, 1}
    # the pretrained encoder was finetuned, not only the head
    moved = [k for k, v in model.encoder.state_dict().items() if not torch.equal(v, before[k])]
    assert "patch_embed.weight" in moved and "blocks.1.attn.qkv.weight" in moved

    # braindecode's preferred form: the class, n_outputs/n_chans/n_times taken from the data;
    # a frozen encoder is a linear probe whose encoder ends as it was loaded
    probe = EEGClassifier(
        BrainmoeClassifier,
        module__encoder=str(folder),
        module__chs_info=info["chs"],
        module__sfreq=info["sfreq"],
        module__freeze_encoder=True,
        train_split=predefined_split(valid_set),
        batch_size=8,
        max_epochs=1,
        device="cpu",
        classes=[0, 1],
        verbose=0,
    )
    probe.fit(train_set, y=None)
    module = probe.module_
    assert (module.n_outputs, module.n_chans, module.n_times) == (2, 64, 480)
    for name, value in module.encoder.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0)
    assert probe.predict_proba(valid_set).shape == (15, 2)
