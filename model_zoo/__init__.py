"""Models and data for unified multimodal training: transformers' own Emu3 and Janus (their checkpoints
too), image tokenizers (the project's VQ on digits, or a checkpoint's VQ-VAE), and the multimodal data
pipeline (digits, a user's image-caption pairs, or a tokenized corpus through Hugging Face `datasets`).
model_zoo never imports distopt or launcher: models and optimizer are siblings."""

from model_zoo.build import Data, build_data, build_image_tokenizer, build_model, build_vocab, layout_for  # noqa: F401
