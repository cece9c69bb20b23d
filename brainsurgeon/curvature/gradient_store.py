"""Where the per-sample gradient matrix G^T (p x n, float32) lives: in memory, or in a scratch file read one
Fisher block (or a few weights) at a time, so that peak memory stops growing with the model."""
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

FLOAT_BYTES = 4
TRANSPOSE_BUFFER_BYTES = 256 * 2**20


class InMemoryGradients:
    """G^T as one p x n tensor."""

    streamed = False

    def __init__(self, gradients_t: torch.Tensor):
        self.gradients_t = gradients_t

    @classmethod
    def from_chunks(cls, chunks, num_weights: int, num_samples: int) -> "InMemoryGradients":
        gradients_t = torch.empty(num_weights, num_samples, dtype=torch.float32)
        for start, stop, chunk in chunks:
            gradients_t[:, start:stop] = chunk.T
        return cls(gradients_t)

    @property
    def shape(self):
        return tuple(self.gradients_t.shape)

    def rows(self, region: slice) -> torch.Tensor:
        return self.gradients_t[region]

    def take(self, index: torch.Tensor) -> torch.Tensor:
        return self.gradients_t[index]


class DiskGradients:
    """G^T in a weight-major scratch file: a block's rows, or one weight's gradient column, are contiguous."""

    streamed = True

    def __init__(self, path: Path, num_weights: int, num_samples: int):
        self.path = Path(path)
        self.shape = (num_weights, num_samples)
        self._file = open(self.path, "rb")

    @classmethod
    def from_chunks(cls, chunks, num_weights: int, num_samples: int, directory) -> "DiskGradients":
        """Append sample chunks to a sample-major file, then transpose it region by region."""
        directory = Path(directory)
        by_sample = directory / "gradients_by_sample.f32"
        with open(by_sample, "wb") as handle:
            for _, _, chunk in chunks:
                handle.write(chunk.contiguous().numpy().tobytes())
        by_weight = directory / "gradients_by_weight.f32"
        rows_per_region = max(1, TRANSPOSE_BUFFER_BYTES // (num_samples * FLOAT_BYTES))
        with open(by_sample, "rb") as source, open(by_weight, "wb") as target:
            for start in range(0, num_weights, rows_per_region):
                count = min(rows_per_region, num_weights - start)
                region = np.empty((num_samples, count), dtype=np.float32)
                for sample in range(num_samples):
                    offset = (sample * num_weights + start) * FLOAT_BYTES
                    region[sample] = np.frombuffer(os.pread(source.fileno(), count * FLOAT_BYTES, offset), np.float32)
                target.write(np.ascontiguousarray(region.T).tobytes())
        by_sample.unlink()
        return cls(by_weight, num_weights, num_samples)

    def _read_rows(self, start: int, count: int) -> np.ndarray:
        width = self.shape[1]
        raw = os.pread(self._file.fileno(), count * width * FLOAT_BYTES, start * width * FLOAT_BYTES)
        return np.frombuffer(raw, dtype=np.float32).reshape(count, width)

    def rows(self, region: slice) -> torch.Tensor:
        start, stop, _ = region.indices(self.shape[0])
        return torch.from_numpy(self._read_rows(start, stop - start).copy())

    def take(self, index: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.stack([self._read_rows(int(i), 1)[0] for i in index]))

    def close(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


def scratch_directory(parent=None) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="brainsurgeon-", dir=parent)
