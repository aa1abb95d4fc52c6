"""The NLI classifier at work: class probabilities of sentence pairs, and the consistency reward of
a response against its persona.

    classify   `class_probabilities(classifier, pairs)`: jitted and batched like the DNLI scorer
    reward     `NliReward(classifier)(personas, responses)`: Song et al.'s reward, one number a response
"""

from pdpo_jax.nli.classify import class_probabilities
from pdpo_jax.nli.reward import REWARD_MODES, NliReward, reward_of_sentences

__all__ = ["REWARD_MODES", "NliReward", "class_probabilities", "reward_of_sentences"]
