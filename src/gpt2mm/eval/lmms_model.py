"""`lmms-eval --model gpt2mm --model_args pretrained=DIR[,device=cpu,dtype=float32] [--batch_size N]`.

Registered through lmms-eval's `lmms_eval.models` entry point (`gpt2mm.eval.lmms.manifest`). Each
`generate_until` request is answered greedily by `gpt2mm.serve.engine.Engine`, the generation path of
`gpt2mm ask` and the HTTP API: the request's text as the user turn with its images (before the text, or where
its `<image>` placeholders stand), the answer post-processed as the processor does and cut at the task's
`until` strings. Greedy whatever the task asks, as `gpt2mm eval` decodes. `--batch_size N` answers N requests
per `generate` call (left padding). One process: under `accelerate launch` every process would answer every
request. Importing this module needs lmms-eval.
"""

from __future__ import annotations

from typing import Any

from lmms_eval.api.model import lmms
from tqdm import tqdm


class GPT2MM(lmms):
    def __init__(
        self,
        pretrained: str,
        device: str | None = None,  # None: cuda if available, else cpu
        dtype: str = "float32",
        batch_size: int | str = 1,
        max_new_tokens: int = 8,  # when the task's generation_kwargs do not say
        **kwargs: Any,  # lmms-eval also passes max_batch_size
    ) -> None:
        super().__init__()
        from gpt2mm.serve.engine import load_engine

        self.engine = load_engine(pretrained, device, dtype, compile=False)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 1  # "auto": 1
        self.max_new_tokens = int(max_new_tokens)

    def _request(self, request: Any):
        from gpt2mm.serve.engine import GenerationRequest, SamplingParams

        context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
        images = [v.convert("RGB") for v in doc_to_visual(self.task_dict[task][split][doc_id]) or []]
        until = gen_kwargs.get("until") or ()
        params = SamplingParams(
            max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
            stop=(until,) if isinstance(until, str) else tuple(until),
        )
        return GenerationRequest(self.engine.prepare([("user", context, len(images))], images), params)

    def generate_until(self, requests: list[Any]) -> list[str]:
        answers = []
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="gpt2mm")
        for start in range(0, len(requests), self.batch_size):
            batch = [self._request(r) for r in requests[start : start + self.batch_size]]
            self.engine.generate(batch)
            for r in batch:
                if r.error is not None:
                    raise r.error
                answers.append(r.choices[0].text)
            bar.update(len(batch))
        bar.close()
        return answers

    def loglikelihood(self, requests: list[Any]):
        raise NotImplementedError("gpt2mm answers generate_until tasks only")

    def generate_until_multi_round(self, requests: list[Any]):
        raise NotImplementedError("gpt2mm answers generate_until tasks only")
