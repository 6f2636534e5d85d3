"""Unrelated text for locality penalties (FT-KL, MEND training) when the user gives none.

Written for this project: everyday statements from many domains, none about CounterFact's subjects, so that
keeping the model's predictions on them fixed stands for "everything unrelated stays as it was".
"""

LOCALITY_TEXTS: tuple[str, ...] = (
    "Water boils at one hundred degrees Celsius at sea level.",
    "The train to the airport leaves every fifteen minutes from platform two.",
    "She opened the window because the room was too warm.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "In chess, the bishop moves diagonally across the board.",
    "The museum is closed on Mondays and public holidays.",
    "He learned to play the guitar when he was twelve years old.",
    "A triangle has three sides and its angles add up to one hundred and eighty degrees.",
    "The library extended its opening hours during the exam period.",
    "Heavy rain is expected in the north of the country tomorrow afternoon.",
    "The committee will publish its report at the end of the month.",
    "Cats often sleep for more than twelve hours a day.",
    "The bridge was repainted last summer after years of rust.",
    "To reset the device, hold the power button for ten seconds.",
    "The orchestra played a symphony by a nineteenth-century composer.",
    "Most bicycles have two wheels, a frame, pedals and a chain.",
    "The company reported higher sales in the third quarter.",
    "Honey can keep for a very long time if it is stored in a sealed jar.",
    "The children built a sandcastle on the beach near the harbour.",
    "A leap year has three hundred and sixty-six days.",
    "The new software update fixes several security problems.",
    "Mountains are usually colder at the top than at the bottom.",
    "The baker starts work at four in the morning to bake fresh bread.",
)


def default_locality_texts() -> list[str]:
    return list(LOCALITY_TEXTS)
