"""Token generation with an exported decoder in ONNX Runtime, one step per token on its KV cache.

Step t feeds the new tokens (the whole prompt first, then one token), ``attention_mask`` of ones over all positions
so far, ``position_ids`` counting on from the cache length, and the previous step's ``present.*`` as
``past_key_values.*`` (empty, length 0, at the first step; or the shared buffers below). The next token is the
argmax of the last logits (greedy) or a sample from ``softmax(logits / temperature)`` restricted to the ``top_k``
most likely tokens and to the smallest set whose probability reaches ``top_p``.

The cache stays in ONNX Runtime between steps (``OrtValue``s through an I/O binding): only the logits are copied out,
not the (layers x 2 x B x H_kv x T x D) floats of ``present.*`` that ``InferenceSession.run`` would convert to numpy and
back on every token. With a ``--graph fused`` or ``layer`` export and a known length (``empty_cache(capacity=N)``, as
``generate`` does; batch 1 with ORT's GroupQueryAttention, any batch with bitconvert's CachedAttention or
DecoderLayer), each layer's ``past_key_values.*`` and ``present.*`` are bound to one preallocated buffer of N
positions: the layer's attention (or DecoderLayer) node then writes the new keys and values in place instead of
copying the whole cache into a new ``present`` every step (at 7B shapes and position 160 that copy read and wrote 168 MB
per token). The logits are the same bit for bit (tested). Such a cache also keeps its I/O binding: every step rebinds
only the three small inputs and the logits (a fresh buffer each step, so earlier logits stay valid), not the layers x 2
cache buffers in and out (on the 12-layer 192M model 0.11 ms less per token, 3.7%; 0.7% on 4 layers of 7B shape). Its
logits go straight into a new numpy array of the known shape (the vocabulary from the graph, one position with
``bitconvert.logits`` = last), not through ``IOBinding.get_outputs``, which wraps every bound output, cache included,
each step (0.09 ms of a 2.9 ms token on the 192M model).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from onnxruntime import OrtValue

from ..errors import BitconvertError
from ..kernels.pages import zeros_on_huge_pages

REQUIRED_INPUTS = ("input_ids", "attention_mask", "position_ids", "past_key_values.0.key")


@dataclass
class Cache:
    """The KV cache between steps: ``values`` by ``past_key_values.*`` name, ``length`` positions filled, and
    ``capacity`` > 0 when the values are shared buffers of that many positions that the graph writes in place
    (0: each step returns new, longer ``present`` values)."""

    values: dict[str, OrtValue]
    length: int = 0
    capacity: int = 0
    binding: object = field(default=None, repr=False)  # with a capacity: the IOBinding its steps reuse


@dataclass
class Sampling:
    """``temperature`` 0 means greedy; ``top_k`` 0 and ``top_p`` 1 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise BitconvertError("sampling needs temperature >= 0, top-k >= 0 and 0 < top-p <= 1")


def _pick(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """Next token id from the last position's logits (V,)."""
    if sampling.temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / sampling.temperature
    order = np.argsort(-scaled, kind="stable")
    if sampling.top_k:
        order = order[: sampling.top_k]
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    keep = min(int(np.searchsorted(np.cumsum(probs), sampling.top_p)) + 1, len(probs))  # first reaching top_p
    probs = probs[:keep] / probs[:keep].sum()
    return int(order[rng.choice(keep, p=probs)])


class OnnxDecoder:
    """An exported decoder (see :mod:`bitconvert.export.decoder` for its I/O) in an ``onnxruntime.InferenceSession``.

    ``shares_cache``: the graph is bitconvert's ``fused`` or ``layer`` export, whose attention can write the cache in
    place (see the module docstring); ``shares_batched_cache``: at any batch size (bitconvert's CachedAttention or
    DecoderLayer), not only at batch 1 (ORT's GroupQueryAttention)."""

    def __init__(self, session):
        inputs = {value.name: value for value in session.get_inputs()}
        missing = [name for name in REQUIRED_INPUTS if name not in inputs]
        if missing:
            raise BitconvertError(f"this ONNX model is not a KV-cache decoder export: it lacks the input(s) "
                                  f"{', '.join(missing)} (export it with `bitconvert export`)")
        self.session = session
        self.past_names = [name for name in inputs if name.startswith("past_key_values.")]
        self.present_names = [name.replace("past_key_values.", "present.", 1) for name in self.past_names]
        _, self.kv_heads, _, self.head_dim = inputs["past_key_values.0.key"].shape
        self.cache_dtype = np.float16 if inputs["past_key_values.0.key"].type == "tensor(float16)" else np.float32
        metadata = session.get_modelmeta().custom_metadata_map
        self.shares_cache = metadata.get("bitconvert.graph") in ("fused", "layer")
        self.shares_batched_cache = metadata.get("bitconvert.attention") == "bitconvert"
        self.last_logits_only = metadata.get("bitconvert.logits") == "last"
        self.vocab_size = session.get_outputs()[0].shape[-1]

    def empty_cache(self, batch: int = 1, capacity: int = 0) -> Cache:
        """An empty cache; with ``capacity`` > 0 and a graph that ``shares_cache`` (above batch 1: that
        ``shares_batched_cache``), buffers of that many positions written in place (a step beyond them is refused),
        else growing ``present`` values. (ORT 1.32's CPU GroupQueryAttention takes a shared buffer as past context,
        and refuses a multi-token step on past context above batch 1.)"""
        capacity = capacity if self.shares_cache and (batch == 1 or self.shares_batched_cache) else 0
        shape = (batch, self.kv_heads, capacity, self.head_dim)
        dtype = torch.from_numpy(np.empty(0, self.cache_dtype)).dtype
        return Cache({name: OrtValue.ortvalue_from_numpy(zeros_on_huge_pages(shape, dtype).numpy())
                      for name in self.past_names}, 0, capacity)

    def step(self, tokens: np.ndarray, cache: Cache) -> tuple[np.ndarray, Cache]:
        """Run ``tokens`` (B, S) int64 after ``cache``; returns logits (B, S, V) and the grown cache. A cache with a
        capacity is written in place: the returned one shares its buffers, so step on from the newest only."""
        batch, length = tokens.shape
        past = cache.length
        if cache.capacity and past + length > cache.capacity:
            raise BitconvertError(f"the KV cache holds {cache.capacity} positions; {past + length} needed "
                                  "(make it with a larger empty_cache(capacity=...))")
        binding = cache.binding or self._binding(cache)
        # ORT reads these arrays during run_with_iobinding only (they live until this method returns)
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(tokens, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ones((batch, past + length), dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.broadcast_to(np.arange(past, past + length, dtype=np.int64),
                                                               (batch, length)).copy())
        if cache.capacity and isinstance(self.vocab_size, int):  # ORT writes the logits into a new array of ours
            logits = np.empty((batch, 1 if self.last_logits_only else length, self.vocab_size), dtype=np.float32)
            binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
            self.session.run_with_iobinding(binding)
            return logits, Cache(cache.values, past + length, cache.capacity, binding)
        binding.bind_output("logits", "cpu")  # rebound: a new buffer, so the logits returned before stay as they were
        self.session.run_with_iobinding(binding)
        logits, *presents = binding.get_outputs()
        if cache.capacity:
            return logits.numpy(), Cache(cache.values, past + length, cache.capacity, binding)
        return logits.numpy(), Cache(dict(zip(self.past_names, presents)), past + length)

    def _binding(self, cache: Cache):
        """A new I/O binding with the logits output first, then each layer's cache: with a capacity the shared buffer
        as both ``past_key_values.*`` and ``present.*`` (the attention node appends in place), else the past values
        in and new ``present`` outputs."""
        binding = self.session.io_binding()
        binding.bind_output("logits", "cpu")
        for name, present in zip(self.past_names, self.present_names):
            binding.bind_ortvalue_input(name, cache.values[name])
            if cache.capacity:
                binding.bind_ortvalue_output(present, cache.values[name])
            else:
                binding.bind_output(present, "cpu")
        return binding

    def generate(self, prompt: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
                 eos_token_ids: tuple[int, ...] = ()) -> list[int]:
        """The new tokens after ``prompt`` (stops after an end-of-sequence token, which is included)."""
        if not prompt:
            raise BitconvertError("the prompt is empty")
        rng = np.random.default_rng(sampling.seed)
        logits, cache = self.step(np.asarray([prompt]), self.empty_cache(capacity=len(prompt) + max_new_tokens))
        generated: list[int] = []
        while len(generated) < max_new_tokens:
            token = _pick(logits[0, -1], sampling, rng)
            generated.append(token)
            if token in eos_token_ids or len(generated) == max_new_tokens:
                break
            logits, cache = self.step(np.asarray([[token]]), cache)
        return generated
