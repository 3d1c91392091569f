"""The world's word-level tokenizer, a plain ``PreTrainedTokenizerFast``.

Words split on white space; every world word has its own id; ``<pad>`` (id 0) is distinct
from ``<eos>`` (id 1), so padding is never mistaken for the end of a response. Saved with
``save_pretrained``, it loads back with ``AutoTokenizer.from_pretrained`` alone.
"""

from __future__ import annotations

from rlhflab.world.tasks import all_world_words

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


def build_tokenizer(max_operand: int = 9, model_max_length: int = 128):
    """The tokenizer (transformers is imported here, not when the world is: the CLI reads
    configs, which name the world, before it loads the libraries)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, EOS, UNK, *all_world_words(max_operand)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=model_max_length,
        padding_side="right",
    )
