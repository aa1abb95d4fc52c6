"""Generation: samplers, the jitted decode loop with a KV cache, and persona + history -> response text.

    sampling   Greedy, Temperature, TopK, TopP: `choose(logits, key) -> ids`
    decode     `generate(model, input_ids, attention_mask, ...)`: new token ids after each prompt
    tree_decode `generate_tree(model, prompts, ...)`: the same, one prefill per run of nesting prompts
    respond    `respond(model, encoder, prompts, ...)`: responses cut at their end of turn, as text;
               `respond_to_conversations(...)`: (persona, history) pairs in, fitted to the context, in batches
"""

from pdpo_jax.generation.decode import generate
from pdpo_jax.generation.respond import (
    NoRoomToRespond,
    Response,
    context_limit,
    cut_at_stop,
    decode_response,
    respond,
    respond_to_conversations,
    right_padded,
    split_at_stop,
    stop_sequences,
)
from pdpo_jax.generation.sampling import (
    Greedy,
    Sampler,
    Temperature,
    TopK,
    TopP,
    sampler_description,
    sampler_from_config,
)
from pdpo_jax.generation.tree_decode import generate_tree, nested_groups

__all__ = [
    "Greedy", "NoRoomToRespond", "Response", "Sampler", "Temperature", "TopK", "TopP", "context_limit", "cut_at_stop",
    "decode_response", "generate", "generate_tree", "nested_groups", "respond", "respond_to_conversations",
    "right_padded", "sampler_description", "sampler_from_config", "split_at_stop", "stop_sequences",
]
