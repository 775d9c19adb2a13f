"""Inputs that several test modules share.

PARITY_PROMPTS, the parity prompt set: varied in length (5 to ~500 tokens), plain and chat,
code, and non-English text. Chat prompts are tuples of messages, rendered with the model's
template."""

_STORY = (
    "The lighthouse keeper of Hollow Point had kept the lamp burning for forty-one years. "
    "Every evening he climbed the one hundred and twelve steps, trimmed the wick, polished the "
    "great lens, and wrote a line in the log book: the weather, the ships he had seen, and "
    "anything strange the sea had brought. Most entries were short. 'Fog. No ships.' 'Clear, "
    "two trawlers heading north.' But on the night of the storm in late November, he wrote "
    "three full pages, and the people of the village have argued about those pages ever since. "
)

PARITY_PROMPTS: list[str | tuple[dict, ...]] = [
    "The capital of France is",
    ({"role": "user", "content": "What is the boiling point of water at sea level?"},),
    'def quicksort(arr):\n    """Sort a list of numbers in ascending order."""\n',
    "La Révolution française a commencé en 1789 lorsque",
    "人工智能的未来是",
    (
        {"role": "system", "content": "You answer in German."},
        {"role": "user", "content": "Erkläre kurz, was ein Regenbogen ist."},
    ),
    "Q: What is 17 * 23?\nA: Let's think step by step.",
    _STORY * 4 + "\n\nSummarize the story above in one sentence:",
]

_WINDS = ["north", "north-east", "east", "south-east", "south", "south-west", "west", "north-west"]
_WEATHER = ["fog", "rain", "clear skies", "a gale", "drizzle", "snow", "haze"]

# A ship log of 28 varied entries (~650-800 tokens): longer than Gemma3's 512-token sliding
# window, so local layers must drop the early entries while global layers still see them.
LONG_PROMPT = (
    "The log book of the Hollow Point lighthouse, winter season.\n"
    + "".join(
        f"Day {d}: {_WEATHER[(d * 3) % 7]}, wind from the {_WINDS[(d * 5) % 8]}, "
        f"{(d * 7) % 11} ships passed and {(d * 4) % 5} boats came into the harbour.\n"
        for d in range(1, 29)
    )
    + "\nOn which day did the most ships pass, and what was the weather that day?"
)


# ~250 tokens of one story, for the KV cache formats' log-likelihoods.
TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the "
    "steps as his father had taught him. At the top he trimmed the wick, polished the great "
    "lens and watched the ships slide past the reef. One winter night a storm tore the "
    "shutters from their hinges, and in the morning he found a bottle wedged between the "
    "rocks below, its cork sealed with red wax. Inside was a letter written in a careful, "
    "old-fashioned hand, addressed to nobody in particular but meant, it seemed, for him. "
) * 3


# Context-aware decoding's case: a context that contradicts what the model knows.
CAD_CONTEXT = "In this story, the capital of France is Lyon. "
CAD_QUESTION = "What is the capital of France? Answer in one word."
CAD_MESSAGES = [{"role": "user", "content": CAD_CONTEXT + CAD_QUESTION}]


# A phone number: what the structured-output tests constrain text to.
PHONE = r"\d{3}-\d{4}"
