"""Our model inside EleutherAI's lm-evaluation-harness, registered as model `crystal` on import.

    import crystal_lm.eval.harness, lm_eval
    lm_eval.simple_evaluate(model="crystal", model_args="checkpoint=RUN_DIR/checkpoints/phase2_checkpoint_000150",
                            tasks=[...])

It follows lm-eval's own rules for causal models, so scores match its `hf` backend on an exported checkpoint:
context/continuation split by `TemplateLM` (continuation tokens = tokens of context+continuation past the
context's), empty contexts conditioned on the BOS token, inputs cut to the last `max_length + 1` tokens,
rolling log-likelihood over disjoint windows with one token of context, greedy `generate_until` cut at the
stop strings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from crystal_lm.eval.generate import (
    Sampling,
    cut_at_stop,
    decode_continuation,
    generate_batch,
    load_checkpoint,
)


@register_model("crystal")
class CrystalLM(TemplateLM):
    backend = "causal"

    def __init__(
        self,
        checkpoint: str,
        batch_size: int | str = 8,
        max_length: int | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        **kwargs,
    ) -> None:
        super().__init__()
        model, tok = load_checkpoint(checkpoint)
        self.model = model.to(device=device, dtype=getattr(torch, dtype)).eval()
        self.tok = tok
        self._device = device
        self._max_length = int(max_length or model.cfg.max_seq_len)
        if not str(batch_size).isdigit() or int(batch_size) < 1:  # lm-eval's "auto" is not supported either
            raise ValueError(f"crystal model: batch_size must be a positive integer, not {str(batch_size)!r}")
        self.batch_size = int(batch_size)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)  # like LLM360's tokenizer: no BOS added by encoding

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tok.decode(tokens, skip_special_tokens=True)

    @torch.no_grad()
    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        # Longest first, so a batch pads little; answers go back in request order.
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        answers: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            inputs, cont_lens = [], []
            for i in chunk:
                _, context_enc, continuation_enc = requests[i]
                inputs.append((context_enc + continuation_enc)[-(self.max_length + 1) :][:-1])
                # A continuation longer than the window: only its last tokens can be scored.
                cont_lens.append(min(len(continuation_enc), len(inputs[-1])))
            width = max(map(len, inputs))
            batch = torch.full((len(inputs), width), self.eot_token_id, dtype=torch.long)
            for r, inp in enumerate(inputs):  # right padding: causal attention never looks at it
                batch[r, : len(inp)] = torch.tensor(inp)
            logprobs = F.log_softmax(self.model(batch.to(self._device)).float(), dim=-1).cpu()
            for r, i in enumerate(chunk):
                cache_key, _, continuation_enc = requests[i]
                n, c = len(inputs[r]), cont_lens[r]
                lp = logprobs[r, n - c : n]
                target = torch.tensor(continuation_enc[-c:])
                answer = (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
                answers[i] = answer
                if cache_key is not None:
                    self.cache_hook.add_partial("loglikelihood", cache_key, answer)
        return answers  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for (string,) in (req.args for req in requests):
            windows = [
                (None, *lm_utils.make_disjoint_window(w))
                for w in lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            total = sum(ll for ll, _ in self._loglikelihood_tokens(windows))
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(gen_kwargs.pop("max_gen_toks", 256))
            sample = bool(gen_kwargs.pop("do_sample", False)) and float(gen_kwargs.get("temperature", 0)) > 0
            sampling = Sampling(
                max_new_tokens=max_gen,
                temperature=float(gen_kwargs.get("temperature", 0)) if sample else 0.0,
                top_k=None,
                top_p=gen_kwargs.get("top_p"),
                stop=tuple(until),
            )
            prompt = self.tok_encode(context)[-max(1, self.max_length - max_gen) :]
            ids = generate_batch(self.model, [prompt], sampling, {self.eot_token_id})[0]
            text = cut_at_stop(decode_continuation(self.tok, prompt, ids), until)
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
        return out
