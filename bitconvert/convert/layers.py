"""A LLaMA run one decoder layer at a time from a tensor reader: only one layer's weights are ever in memory.

``LayerStream`` splits a checkpoint's tensor names into decoder layers (``<prefix>layers.<i>.<local name>``) and the
rest (embeddings, final norm, lm_head), builds ``LlamaDecoderLayer`` ``i`` in fp32 from the reader, and runs hidden
states (batch, seq, hidden) through it with rotary embeddings for positions ``0..seq-1`` and a causal mask (SDPA).
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch
import torch.nn.functional as F

LAYER_NAME = re.compile(r"^(.*?layers\.)(\d+)\.(.+)$")
EMBEDDING = "embed_tokens.weight"
FORWARD_CHUNK = 4  # sequences per forward call (bounds the attention's intermediate memory)


class LayerStream:
    def __init__(self, reader, config, device: torch.device):
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.reader, self.device = reader, device
        self.config = config.__class__.from_dict(config.to_dict())
        self.config._attn_implementation = "sdpa"  # no mask tensor: SDPA applies the causal mask itself
        self.layer_names: dict[int, dict[str, str]] = defaultdict(dict)  # index -> local name -> full name
        self.other_names: list[str] = []
        for name in reader.names():
            match = LAYER_NAME.match(name)
            if match:
                self.layer_names[int(match.group(2))][match.group(3)] = name
            else:
                self.other_names.append(name)
        self.rotary = LlamaRotaryEmbedding(config=self.config).to(device)

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    def layer_prefix(self, index: int) -> str:
        """``"model.layers.3."`` for layer 3 (whatever the checkpoint's prefix)."""
        local, full = next(iter(self.layer_names[index].items()))
        return full.removesuffix(local)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Hidden states entering layer 0: (batch, seq) int64 -> (batch, seq, hidden) fp32."""
        name = next(name for name in self.other_names if name.endswith(EMBEDDING))
        return F.embedding(ids.to(self.device), self.reader.get(name).float().to(self.device))

    def layer(self, index: int):
        """Decoder layer ``index`` in fp32 on the device, in eval mode; the layer's tensors that are not parameters
        of ``LlamaDecoderLayer`` are returned beside it, unchanged."""
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        with torch.device("meta"):
            layer = LlamaDecoderLayer(self.config, index)
        expected = {name for name, _ in layer.named_parameters()}
        names = self.layer_names[index]
        state = {local: self.reader.get(full).to(self.device, torch.float32, copy=True)  # never the reader's own tensor
                 for local, full in names.items() if local in expected}
        missing = expected - set(state)
        if missing:
            raise ValueError(f"layer {index} lacks {sorted(missing)}")
        layer.load_state_dict(state, assign=True)
        passthrough = {full: self.reader.get(full) for local, full in names.items() if local not in expected}
        return layer.eval(), passthrough

    def position_embeddings(self, hidden: torch.Tensor):
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        return self.rotary(hidden, positions)

    def run(self, layer, hidden: torch.Tensor, chunk: int = FORWARD_CHUNK) -> torch.Tensor:
        """``layer(hidden)`` for (batch, seq, hidden), ``chunk`` sequences at a time, without gradients."""
        with torch.no_grad():
            return torch.cat([self.forward(layer, part) for part in hidden.split(chunk)])

    def forward(self, layer, hidden: torch.Tensor) -> torch.Tensor:
        """One differentiable call of ``layer`` on (batch, seq, hidden)."""
        return layer(hidden, position_embeddings=self.position_embeddings(hidden))


    def stages(self, layer, hidden: torch.Tensor):
        """The inputs of the layer's projection groups, in order, computed lazily from ``layer``'s modules as they are
        when each is asked for (so a caller may quantize a group before the next stage runs). Yields
        ``("attention", x)`` (q/k/v input), ``("values", x)`` (o_proj input), ``("mlp", x)`` (gate/up input),
        ``("down", x)`` (down_proj input), each (batch * seq, features), then ``("output", h)`` (batch, seq, hidden):
        the layer's output, the same ops as ``LlamaDecoderLayer.forward`` with the attention run once."""
        batch, seq, width = hidden.shape
        attention, mlp = layer.self_attn, layer.mlp
        with torch.no_grad():
            yield "attention", layer.input_layernorm(hidden).reshape(-1, width)
            values_in = capture_input(self, layer, attention.o_proj, hidden)
            yield "values", values_in
            hidden = hidden + attention.o_proj(values_in).reshape(batch, seq, -1)
            mlp_in = layer.post_attention_layernorm(hidden).reshape(-1, width)
            yield "mlp", mlp_in
            down_in = mlp.act_fn(mlp.gate_proj(mlp_in)) * mlp.up_proj(mlp_in)
            yield "down", down_in
            yield "output", hidden + mlp.down_proj(down_in).reshape(batch, seq, -1)


class StopForward(Exception):
    """Raised by :func:`capture_input` once the wanted input is seen, to skip the rest of the layer."""


def capture_input(stream: LayerStream, layer, module: torch.nn.Module, hidden: torch.Tensor,
                  chunk: int = FORWARD_CHUNK) -> torch.Tensor:
    """The inputs ``module`` (inside ``layer``) receives when ``layer`` runs on ``hidden``: (batch * seq, features)."""
    seen = []

    def hook(_module, args):
        x = args[0].detach()
        seen.append(x.reshape(-1, x.shape[-1]))
        raise StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for part in hidden.split(chunk):
                try:
                    stream.forward(layer, part)
                except StopForward:
                    pass
    finally:
        handle.remove()
    return torch.cat(seen)
