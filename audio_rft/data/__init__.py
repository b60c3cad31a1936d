"""Data prep: the sample schema, audio I/O, prepared-dataset folders and the builders."""

from audio_rft.data.schema import TASKS, Sample, SampleError  # noqa: F401
from audio_rft.data.dataset import DatasetWriter, load_dataset, resolve_audio  # noqa: F401
