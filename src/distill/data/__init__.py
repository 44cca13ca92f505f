"""Datasets: bundled offline sets, generic loaders, and the `DataBundle` contract a recipe's data
follows. May import only the contracts."""

from distill.data import cifar  # noqa: F401  (registers cifar100, cifar100_standin)
from distill.data.bundle import DataBundle, build_data
from distill.data.digits import digits
from distill.data.indexed import IndexedDataset, indexed
from distill.registry import DATASETS

# Generated sets whose code needs optional extras (torchvision / librosa): imported on first use.
DATASETS.add_lazy("shapes", "distill.data.shapes.shapes_data")
DATASETS.add_lazy("speech_words", "distill.data.speech.speech_data")
# Data a user has, with no code (docs/your_data.md): an image folder, a CSV/Parquet table, torchvision.
DATASETS.add_lazy("image_folder", "distill.data.sources.image_folder")
DATASETS.add_lazy("table", "distill.data.sources.table")
DATASETS.add_lazy("torchvision", "distill.data.sources.torchvision_dataset")
# Tokenized text sets (they need a tokenizer: transformers, the [nlp] extra), imported on use.
for _name in (
    "text_classification",
    "text",
    "chat",
    "prompt_response",
    "fortune_chat",
    "sequence_kd",
    "chat_prompts",
):
    DATASETS.add_lazy(_name, f"distill.nlp.text_data.{_name}")
# A served teacher's answers (top-k log-probabilities, OpenAI format) as the student's texts.
DATASETS.add_lazy("served_responses", "distill.nlp.text_data.served_responses")

__all__ = ["DataBundle", "IndexedDataset", "build_data", "digits", "indexed"]
