"""The data plane: EEG sources -> preprocessed windows -> WebDataset shards, and the reader."""
