"""``bitconvert generate FOLDER``: a converted folder in PyTorch through :func:`bitconvert.load` and the lean
:class:`~.decode.Decoder` (transformers' ``generate`` for models the decoder does not run, e.g. SubLN)."""

from __future__ import annotations

import sys
import time

import torch


def run_folder(args) -> int:
    """Print the continuation of ``args.prompt`` by the folder ``args.model``, then the speed on stderr."""
    import numpy as np
    from transformers import AutoTokenizer

    from ..errors import BitconvertError, reason
    from ..export.generate import Sampling, _pick
    from ..load import load
    from .decode import Decoder, supported

    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    model = load(args.model, lm_head=args.lm_head)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except Exception as exc:
        raise BitconvertError(f"'{args.model}' has no usable tokenizer ({reason(exc)})") from None
    prompt = tokenizer(args.prompt)["input_ids"]
    eos = () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
    rng = np.random.default_rng(sampling.seed)
    prefill_s = None
    if supported(model) is None:
        decoder = Decoder(model, max_len=len(prompt) + args.max_new_tokens, kv_cache=args.kv_cache)
        decoder.forward(torch.tensor(prompt[:1]))  # warm-up (first calls, allocator)
        decoder.reset()
        start = time.perf_counter()
        logits = decoder.forward(torch.tensor(prompt))
        prefill_s = time.perf_counter() - start
        tokens = decoder.continue_from(logits, args.max_new_tokens, eos,
                                       lambda logits: _pick(logits.numpy(), sampling, rng))
    else:
        if args.kv_cache != "fp32":
            raise BitconvertError(f"--kv-cache {args.kv_cache} needs the lean decoder, which does not run this model "
                                  f"({supported(model)}); drop --kv-cache")
        start = time.perf_counter()
        with torch.no_grad():
            output = model.generate(torch.tensor([prompt]), max_new_tokens=args.max_new_tokens,
                                    do_sample=sampling.temperature > 0, temperature=sampling.temperature or None,
                                    top_k=sampling.top_k or None, top_p=sampling.top_p)
        tokens = output[0, len(prompt):].tolist()
    seconds = time.perf_counter() - start
    print(args.prompt + tokenizer.decode(tokens, skip_special_tokens=True))
    detail = ""
    if prefill_s is not None and len(tokens) > 1:
        detail = (f"; prefill {len(prompt) / prefill_s:.1f} tokens/s, decoding "
                  f"{(len(tokens) - 1) / (seconds - prefill_s):.1f} tokens/s")
    print(f"[{len(prompt)} prompt + {len(tokens)} new tokens in {seconds:.2f} s, "
          f"{len(tokens) / seconds:.1f} new tokens/s incl. the prompt{detail}]", file=sys.stderr)
    return 0
