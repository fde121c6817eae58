"""
huggingface_hub's private parts this package relies on: its provider request builders, used offline.

Each Inference Provider's request (URL, headers, body) is built by huggingface_hub itself, so that ours follows its
changes: the helper comes from the private `huggingface_hub.inference._providers.PROVIDERS` table. But a helper asks
the Hub for the model's provider mapping and falls back to the token stored by `hf auth login`; we look the mapping
up ourselves (cached, bounded, under our deadline) and pass only our token, by answering the helper's two private
steps (`_prepare_api_key`, `_prepare_mapping_info`) on a copy of it. An edit's image goes in as the private
`huggingface_hub.inference._common.MimeBytes`, as `InferenceClient.image_to_image` passes it. A public
`prepare_request(..., provider_mapping_info=..., api_key=...)` would remove this module (docs/upstream.md);
tests/test_upstream.py checks the shape each function relies on.
"""

from typing import Any

from huggingface_hub.hf_api import InferenceProviderMapping
from huggingface_hub.inference._common import MimeBytes, RequestParameters
from huggingface_hub.inference._providers import PROVIDERS, TaskProviderHelper

ProviderHelper = TaskProviderHelper  # what builds one provider's request for one task


def provider_helper(provider: str, task: str) -> ProviderHelper:
    """huggingface_hub's request builder for `provider` and `task`."""
    return PROVIDERS[provider][task]  # type: ignore[index]


def image_input(data: bytes, mime_type: str) -> bytes:
    """An image input for a provider helper: the bytes with their MIME type."""
    return MimeBytes(data, mime_type)


def prepare_request_offline(
    helper: ProviderHelper, mapping: InferenceProviderMapping, token: str | None, **request: Any
) -> RequestParameters:
    """`helper.prepare_request(**request)` with `mapping` and `token` (or none): no Hub lookup, no stored login."""
    bound = object.__new__(type(helper))
    bound.__dict__.update(helper.__dict__)
    bound._prepare_api_key = lambda _api_key: token or ""  # type: ignore[method-assign]
    bound._prepare_mapping_info = lambda _model: mapping  # type: ignore[method-assign]
    return bound.prepare_request(**request)
