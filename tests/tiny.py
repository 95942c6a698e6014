"""Tiny random LLaMA models and a byte-level tokenizer, made on the spot so tests run in seconds and offline."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 260  # 256 bytes + 4 specials
# "<s>Hello world!\nAB" in the byte tokenizer's ids: a short prompt for logit comparisons.
SAMPLE_IDS = torch.tensor([[256, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33, 10, 65, 66]])


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: every byte is one token."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: index for index, token in enumerate(sorted(alphabet))}
    for special in ("<s>", "</s>", "<unk>", "<pad>"):
        vocab[special] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def tiny_config(**overrides) -> LlamaConfig:
    options = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=256,
                   eos_token_id=257, pad_token_id=259)
    options.update(overrides)
    return LlamaConfig(**options)


def make_tiny_llama(folder: Path, seed: int = 0, dtype=torch.float32, **overrides) -> Path:
    """Save a random tiny LLaMA (GQA, 2 layers) with its tokenizer to ``folder``; returns ``folder``."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**overrides)).to(dtype).eval()
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def assert_stock_transformers_matches_bitconvert_load(folder: Path) -> None:
    """A calibrated output read by stock ``from_pretrained`` and by ``bitconvert.load`` gives the same logits on
    SAMPLE_IDS. Both compute the same integer product and differ only in the order of the fp32 scaling: a few ulps,
    unless an ulp moves an activation across an int8 rounding boundary. Then one code flips and the later layers
    carry it on (seen: one flip at layer 0's down_proj input, 3e-8 apart, grew to a logit difference of 1.0% of the
    logits' spread). A renamed or misread tensor moves logits by O(spread): 3% of the spread separates the two."""
    from transformers import AutoModelForCausalLM

    from bitconvert.load import load

    with torch.no_grad():
        stock = AutoModelForCausalLM.from_pretrained(folder).eval()(SAMPLE_IDS).logits
        ours = load(folder)(SAMPLE_IDS).logits
    assert (stock - ours).abs().max().item() < 0.03 * stock.std().item()


def _permute_for_gguf(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order (rotary halves interleaved); transformers undoes it when loading GGUF."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, weight.shape[1]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(model_folder: Path, path: Path) -> Path:
    """Write the tiny LLaMA saved in ``model_folder`` as an F32 GGUF file (llama.cpp's tensor names and layout)."""
    import gguf

    model = LlamaForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    tokenizer = byte_tokenizer()
    tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3] * 4)
    writer.add_token_merges([])
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    state = {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for layer in range(config.num_hidden_layers):
        for hf_name, gguf_name in names.items():
            tensor = model.state_dict()[f"model.layers.{layer}.{hf_name}.weight"]
            if hf_name == "self_attn.q_proj":
                tensor = _permute_for_gguf(tensor, config.num_attention_heads)
            elif hf_name == "self_attn.k_proj":
                tensor = _permute_for_gguf(tensor, config.num_key_value_heads)
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", tensor.contiguous().numpy())
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.add_tensor("output.weight", state["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
