"""OpenAI-format aggregators (OpenRouter, SiliconFlow, DMXAPI, Together, Fireworks...).

The same wire format and code as `adapters.openai` (chat completions, image generation
and edits, speech where the host has it); only the setup differs:

    base_url     required (there is no default host), e.g. https://openrouter.ai/api/v1
    options      auth_header: "Authorization" (default) | "X-Api-Key" | ...
                 auth_scheme: "Bearer" (default) | "" (the bare key)
                 headers:     extra headers (OpenRouter's HTTP-Referer / X-Title)
                 stream_usage: false for hosts that refuse `stream_options`

Model ids on these hosts are their own (`openai/gpt-image-1`, `black-forest-labs/FLUX.1-dev`),
so the OpenAI capability tables rarely match and parameters pass through for the host to
judge; an exact OpenAI id (`gpt-image-1`) still gets OpenAI's checks.
"""

from __future__ import annotations

from adapters.openai import OpenAIAdapter
from core import params


class OpenAICompatibleAdapter(OpenAIAdapter):
    name = "openai_compatible"
    default_base_url: str | None = None  # every aggregator lives elsewhere: the deployment must say where
    # aggregators' open models take a few more sampling and diffusion knobs than OpenAI's
    provider_params = {
        "image": OpenAIAdapter.provider_params["image"] | {"negative_prompt", "num_inference_steps", "guidance_scale", "steps"},
        "video": OpenAIAdapter.provider_params["video"],
        "audio": OpenAIAdapter.provider_params["audio"],
        "text": params.CHAT | {"top_k", "min_p", "repetition_penalty", "top_a"},
    }
