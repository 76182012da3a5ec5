"""PhysioNet EEGMMIDB's left/right-fist runs as a MOABB dataset, for subjects PhysionetMI
cannot load here.

MOABB's ``PhysionetMI`` loads a subject's fist runs *and* its fists/feet runs together, so a
subject whose feet runs are missing (the local copy of S004/S005 holds only runs 3, 4, 7, 8,
11, 12) cannot be loaded at all, although LeftRightImagery only ever reads the fist runs.
This class is PhysionetMI without the feet runs: the same files, channel names, montage,
events and 0-3 s interval, so its LeftRightImagery epochs are PhysionetMI's (identical for
subjects 1-3) and MOABB's evaluations take it like any dataset.
"""

from __future__ import annotations

from moabb.datasets import PhysionetMI
from moabb.datasets.base import BaseDataset


class PhysionetFists(PhysionetMI):
    """EEGMMIDB left/right fist runs only (imagined 4, 8, 12; executed 3, 7, 11).

    Offline it reads ``$MNE_DATA/MNE-eegbci-data/files/eegmmidb/1.0.0/S00N/S00NR??.edf``;
    set ``MOABB_DOWNLOAD_PROVIDER=upstream`` so MOABB does not wait on a mirror first.
    """

    EVENTS = {"left_hand": 2, "right_hand": 3, "rest": 1}

    def __init__(self, imagined: bool = True, executed: bool = False, subjects=None):
        # PhysionetMI's own __init__ hard-codes its code and the feet runs.
        BaseDataset.__init__(
            self,
            subjects=list(range(1, 110)),
            sessions_per_subject=1,
            events=self.EVENTS,
            code="PhysionetFists",
            interval=[0, 3],
            paradigm="imagery",
            doi="10.1109/TBME.2004.827072",
            selected_subjects=subjects,
        )
        self.events = dict(self.EVENTS)
        self.imagined, self.executed = imagined, executed
        self.hand_runs = [4, 8, 12] * imagined + [3, 7, 11] * executed
        self.feet_runs = []

    def data_path(self, subject, path=None, force_update=False, update_path=None, verbose=None):
        """The fist runs only (PhysionetMI's also asks for the baselines R01/R02)."""
        if subject not in self.subject_list:
            raise ValueError(f"invalid subject {subject}")
        return self._load_data(subject, self.hand_runs, path, force_update, verbose)
