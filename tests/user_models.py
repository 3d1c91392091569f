"""A user's own setup, built inside a test: byte-level BPE tokenizers trained here, chat
templates (ChatML as Qwen2 has it, Llama 2's [INST], Mistral's [INST] without a system turn),
and tiny Qwen2 / Llama / Mistral / GPT-NeoX / GPT-2 models created from their transformers
configs (nothing from a hub)."""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA2 = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] "
    "+ ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ '<<SYS>>' + message['content'] + '<</SYS>>' }}{% endif %}{% endfor %}"
)

MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] "
    "+ ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}"
)

CORPUS = [
    "the quick brown fox jumps over the lazy dog", "hello there, how are you today?",
    "which response is more helpful? (A) or (B) The answer is: (A) (B)", "A) B) yes no maybe",
    "please write a short poem about the sea", "i can't help with that request, sorry",
    "the capital of france is paris", "two plus two is four", "how do i kill a process ?",
    "Human: Assistant: system user assistant", "1 2 3 4 5 6 7 8 9 0 . , ! ? : ; ( ) [ ] { }",
]


def bpe_tokenizer(out: Path | None = None, *, template: str | None = CHATML, vocab_size: int = 400,
                  eos: str = "<|im_end|>", bos: str | None = None, pad: str | None = None,
                  corpus: list[str] | None = None, add_bos: bool = False, padding_side: str = "right"):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on a small corpus, with ChatML's
    markers as special tokens; ``pad=None`` leaves it without a pad token (as Qwen2's and
    Llama's often are), ``pad=eos`` pads with EOS (GPT-2's habit); ``add_bos`` makes it
    write ``bos`` before every text it encodes with special tokens (Llama's and Mistral's
    ``add_bos_token``). Saved to ``out`` if given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    specials += [t for t in dict.fromkeys((bos, eos)) if t and t not in specials]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((corpus or CORPUS) * 4, trainer)
    if add_bos:
        if not bos:
            raise ValueError("add_bos needs a bos token")
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    kwargs = dict(eos_token=eos, unk_token=None)
    if bos:
        kwargs["bos_token"] = bos
    if pad:
        kwargs["pad_token"] = pad
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side=padding_side, **kwargs)
    if template:
        fast.chat_template = template
    if out is not None:
        fast.save_pretrained(str(out))
    return fast


def tiny_causal_lm(tokenizer, arch: str = "qwen2", *, seed: int = 0, hidden: int = 32, layers: int = 2):
    """A randomly initialised tiny causal LM of ``arch`` (qwen2, llama, mistral, gpt_neox,
    gpt2) sized to the tokenizer's vocabulary."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
    )

    torch.manual_seed(seed)
    vocab = len(tokenizer)
    common = dict(vocab_size=vocab, eos_token_id=tokenizer.eos_token_id,
                  bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    # Qwen2, Llama and Mistral share the decoder's shape (grouped-query attention, 2 KV heads).
    decoder = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **common)
    if arch == "qwen2":
        cfg = Qwen2Config(tie_word_embeddings=True, **decoder)
    elif arch == "llama":
        cfg = LlamaConfig(**decoder)
    elif arch == "mistral":
        cfg = MistralConfig(sliding_window=None, **decoder)
    elif arch == "gpt_neox":
        # Pythia's layout: fused query_key_value, partial rotary, parallel attention + MLP, untied head.
        cfg = GPTNeoXConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                            num_attention_heads=4, max_position_embeddings=512, rotary_pct=0.25,
                            use_parallel_residual=True, tie_word_embeddings=False, **common)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=512, **common)
    else:
        raise ValueError(arch)
    return AutoModelForCausalLM.from_config(cfg)
