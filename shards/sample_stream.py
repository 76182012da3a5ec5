"""Shard URLs -> decoded samples, skipping damage: the reader's stages that touch the bytes.

Damaged data is skipped, not fatal: one bad file in a 10,000-shard corpus must not stop a
multi-node run. An unreadable shard (missing, truncated, garbage) ends that shard with a
`ShardReadWarning` naming it, and a shard that ends early without any error (tar cannot tell
a cut at a member boundary from the end) is caught by comparing its sample count with
sizes.json. A sample that fails to decode is skipped the same way. Failures many times in a
row raise instead: then the corpus is gone or broken, and in resampled mode skipping would
spin forever, stalling every rank.

Object stores: a shard URL (s3://bucket/corpus/..., see storage.py) is opened with fsspec and
streamed through webdataset's tar iterator block by block, never downloaded whole, so a
worker holds one read block, not one shard.

Both stages are module-level and picklable, so spawn-started DataLoader workers can rebuild
them; the pipeline that strings them together is shards/reader.py.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator

import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from shards import storage
from shards.manifest import SIZES
from shards.sample import decode_sample


class ShardReadWarning(UserWarning):
    """A shard or sample was skipped; its own category so runs can escalate it to an error."""


def _warn(message: str) -> None:
    warnings.warn(message, ShardReadWarning, stacklevel=2)


def _describe(err: Exception) -> str:
    # webdataset appends the stream and URL to exception args; the first one is the message.
    return f"{type(err).__name__}: {err.args[0] if err.args else ''}"


class ReadShards(wds.PipelineStage):
    """Tar members -> raw samples, one shard at a time, so a damaged shard is attributed
    by name and skipped without losing the shards after it (webdataset's handlers only see
    the exception, whose arguments name the shard inconsistently).

    Many failures in a row mean the corpus, not a shard, is broken (a lost mount): that
    raises, since in resampled mode it would otherwise spin forever, stalling every rank.
    """

    def __init__(self, sizes: dict[str, int | None], max_failures_in_a_row: int = 100):
        self.sizes, self.max_failures = sizes, max_failures_in_a_row

    def run(self, src: Iterable[dict]) -> Iterator[dict]:
        failures = 0  # shards in a row that gave no sample although they should have
        for shard in src:
            if failures >= self.max_failures:
                raise RuntimeError(
                    f"{failures} shards in a row could not be read (see the warnings): "
                    "is the corpus still there?"
                )
            url = shard["url"]
            expected = self.sizes.get(url)
            count = 0
            try:
                # fsspec streams URLs (s3://...); pipe: and paths keep webdataset's opener
                stream = storage.open_read(url) if storage.is_uri(url) else wds.gopen(url)
            except Exception as err:
                _warn(f"skipping shard {url}: cannot open it: {_describe(err)}")
                failures += 1
                continue
            try:
                files = tar_file_expander([{"url": url, "stream": stream}], eof_value=None)
                for sample in group_by_keys(files):
                    count += 1
                    yield sample
            except Exception as err:
                _warn(f"skipping the rest of shard {url} after {count} sample(s): {_describe(err)}")
            else:
                if expected is not None and count != expected:
                    _warn(
                        f"shard {url} held {count} sample(s) but {SIZES} says {expected}: "
                        "truncated, or a stale sizes.json?"
                    )
            finally:
                stream.close()
            failures = 0 if count or expected == 0 else failures + 1


class DecodeSamples(wds.PipelineStage):
    """Raw samples -> arrays; a sample that fails to decode (or holds NaN/inf) is skipped
    with a warning. Many in a row mean the corpus is broken, not a sample: that raises,
    since in resampled mode a corpus without one good sample would otherwise spin forever."""

    def __init__(self, max_failures_in_a_row: int = 1000):
        self.max_failures = max_failures_in_a_row

    def run(self, src: Iterable[dict]) -> Iterator[dict]:
        failures = 0
        for raw in src:
            try:
                sample = decode_sample(raw)
            except Exception as err:
                _warn(
                    f"skipping sample {raw.get('__key__')} of shard {raw.get('__url__')}: "
                    f"{_describe(err)}"
                )
                failures += 1
                if failures >= self.max_failures:
                    raise RuntimeError(
                        f"{failures} samples in a row could not be used (last: "
                        f"{_describe(err)}): the corpus is broken; check it with "
                        "`brainmoe shards verify` and rebuild it"
                    ) from err
                continue
            failures = 0
            yield sample
