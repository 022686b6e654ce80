"""The built-in example exchange that the Vicuna v0 ("one shot") prompt starts with.

Vicuna v0 was trained and served with this one example conversation placed after the system
prompt, so the text must stay byte-for-byte what the model saw (including the typographic
apostrophe in the question). It is prompt data reproduced from FastChat's `one_shot`
conversation template (Apache-2.0), not code.
"""

EXAMPLE_QUESTION = "Got any creative ideas for a 10 year old\u2019s birthday?"

EXAMPLE_ANSWER = "\n".join(
    (
        "Of course! Here are some creative ideas for a 10-year-old's birthday party:",
        "1. Treasure Hunt: Organize a treasure hunt in your backyard or nearby park. Create clues"
        " and riddles for the kids to solve, leading them to hidden treasures and surprises.",
        "2. Science Party: Plan a science-themed party where kids can engage in fun and"
        " interactive experiments. You can set up different stations with activities like making"
        " slime, erupting volcanoes, or creating simple chemical reactions.",
        "3. Outdoor Movie Night: Set up a backyard movie night with a projector and a large screen"
        " or white sheet. Create a cozy seating area with blankets and pillows, and serve popcorn"
        " and snacks while the kids enjoy a favorite movie under the stars.",
        "4. DIY Crafts Party: Arrange a craft party where kids can unleash their creativity."
        " Provide a variety of craft supplies like beads, paints, and fabrics, and let them create"
        " their own unique masterpieces to take home as party favors.",
        "5. Sports Olympics: Host a mini Olympics event with various sports and games. Set up"
        " different stations for activities like sack races, relay races, basketball shooting,"
        " and obstacle courses. Give out medals or certificates to the participants.",
        "6. Cooking Party: Have a cooking-themed party where the kids can prepare their own mini"
        " pizzas, cupcakes, or cookies. Provide toppings, frosting, and decorating supplies, and"
        " let them get hands-on in the kitchen.",
        "7. Superhero Training Camp: Create a superhero-themed party where the kids can engage in"
        " fun training activities. Set up an obstacle course, have them design their own"
        " superhero capes or masks, and organize superhero-themed games and challenges.",
        "8. Outdoor Adventure: Plan an outdoor adventure party at a local park or nature reserve."
        " Arrange activities like hiking, nature scavenger hunts, or a picnic with games."
        " Encourage exploration and appreciation for the outdoors.",
        "Remember to tailor the activities to the birthday child's interests and preferences."
        " Have a great celebration!",
    )
)

EXAMPLE_TURNS = (("user", EXAMPLE_QUESTION), ("assistant", EXAMPLE_ANSWER))
