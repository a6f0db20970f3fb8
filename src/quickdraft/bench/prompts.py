"""quickdraft's own small prompt set, used by ``quickdraft bench`` when no ``--dataset`` is given.

Three prompts per task group, in the groups Spec-Bench reports (multi-turn, translation, summarization,
qa, math_reasoning, rag). All text here was written for quickdraft; it is not taken from any dataset.
Each entry has the keys of a Spec-Bench row (``question_id``, ``category``, ``turns``); the multi-turn
entries carry MT-Bench category names, which the reader folds into the "multi-turn" group.
"""

from __future__ import annotations

BUILTIN_QUESTIONS: list[dict] = [
    # --- multi-turn (two user turns each) ---
    {
        "question_id": "qd-mt-1",
        "category": "writing",
        "turns": [
            "Write a short letter from a lighthouse keeper to the town council asking for a new lamp. "
            "Mention the storms of last winter and the fishing boats that depend on the light.",
            "Now rewrite the letter as a four-line poem that keeps the request clear.",
        ],
    },
    {
        "question_id": "qd-mt-2",
        "category": "coding",
        "turns": [
            "Write a Python function that returns the longest run of equal consecutive items in a list, "
            "as a pair (item, length). Explain it in two sentences.",
            "Add type hints and a docstring with one example, and make it handle an empty list.",
        ],
    },
    {
        "question_id": "qd-mt-3",
        "category": "reasoning",
        "turns": [
            "Three friends, Ana, Ben and Chen, each own one pet: a cat, a dog or a parrot. Ana is allergic "
            "to fur. Ben's pet cannot fly. Chen does not own the dog. Who owns which pet?",
            "Explain how you would check your answer, step by step.",
        ],
    },
    # --- translation (German to English) ---
    {
        "question_id": "qd-tr-1",
        "category": "translation",
        "turns": [
            "Translate German to English: Der kleine Bahnhof am Rand des Dorfes wird seit Jahren nur noch "
            "zweimal am Tag von einem Zug angefahren, doch die Bewohner wollen ihn nicht aufgeben."
        ],
    },
    {
        "question_id": "qd-tr-2",
        "category": "translation",
        "turns": [
            "Translate German to English: Nach dem langen Regen blühten die Wiesen im Tal früher als "
            "gewöhnlich, und die Imker freuten sich über eine reiche Ernte."
        ],
    },
    {
        "question_id": "qd-tr-3",
        "category": "translation",
        "turns": [
            "Translate German to English: Die Stadtbibliothek verlängert ihre Öffnungszeiten am Wochenende, "
            "damit auch Berufstätige in Ruhe lesen und lernen können."
        ],
    },
    # --- summarization ---
    {
        "question_id": "qd-sum-1",
        "category": "summarization",
        "turns": [
            "Summarize the following article in two sentences.\n\n"
            "The harbour town of Eastmere opened a repair café last spring, where volunteers fix broken "
            "toasters, lamps, bicycles and clothes for free. In its first year the café recorded more than "
            "nine hundred repairs. The organisers say the most common fault was a loose wire, and that most "
            "visitors stayed to learn how to do the repair themselves. The town council has now agreed to "
            "pay the rent of the workshop for another three years, and two schools plan to send pupils to "
            "the café for practical lessons in electronics and sewing."
        ],
    },
    {
        "question_id": "qd-sum-2",
        "category": "summarization",
        "turns": [
            "Summarize the following article in two sentences.\n\n"
            "A team of students built a weather station on the roof of their school using cheap sensors and "
            "a small single-board computer. The station measures temperature, humidity, wind speed and "
            "rainfall every five minutes and publishes the readings on a public web page. Over one year the "
            "students compared their data with the national weather service and found their temperature "
            "readings within half a degree most of the time, although their rain gauge clogged twice with "
            "leaves. They are now writing a guide so that other schools can build the same station."
        ],
    },
    {
        "question_id": "qd-sum-3",
        "category": "summarization",
        "turns": [
            "Summarize the following article in two sentences.\n\n"
            "The regional bus company has replaced paper timetables at forty stops with small solar-powered "
            "displays that show the real arrival time of the next bus. Passengers had complained for years "
            "that printed timetables were out of date after every schedule change. During a six-month trial "
            "the company found that complaints about waiting times fell by a third. Some older passengers "
            "asked that paper timetables be kept as well, so the company will print a simplified version "
            "next to each display."
        ],
    },
    # --- qa ---
    {
        "question_id": "qd-qa-1",
        "category": "qa",
        "turns": ["Why does the sky look blue on a clear day? Answer in a few sentences."],
    },
    {
        "question_id": "qd-qa-2",
        "category": "qa",
        "turns": ["What is the difference between weather and climate?"],
    },
    {
        "question_id": "qd-qa-3",
        "category": "qa",
        "turns": ["How do bees make honey? Give a short explanation."],
    },
    # --- math_reasoning ---
    {
        "question_id": "qd-math-1",
        "category": "math_reasoning",
        "turns": [
            "A bakery sells muffins for 3 dollars each and cookies for 2 dollars each. Mia buys 4 muffins "
            "and 5 cookies and pays with a 50 dollar note. How much change does she get? Think step by step."
        ],
    },
    {
        "question_id": "qd-math-2",
        "category": "math_reasoning",
        "turns": [
            "A train leaves at 9:40 and arrives at 13:15. It stops for 5 minutes at each of 3 stations on "
            "the way. How many minutes does the train spend moving? Think step by step."
        ],
    },
    {
        "question_id": "qd-math-3",
        "category": "math_reasoning",
        "turns": [
            "A garden is 12 metres long and 7 metres wide. A path 1 metre wide runs all the way around the "
            "inside edge. What is the area of the garden that is not path? Think step by step."
        ],
    },
    # --- rag (answer from the given passages) ---
    {
        "question_id": "qd-rag-1",
        "category": "rag",
        "turns": [
            "Answer the question using the passages.\n\n"
            "Passage 1: The Oriel Canal was dug between 1791 and 1797 to carry coal from the hill mines to "
            "the river port of Lenby.\n"
            "Passage 2: After the railway reached Lenby in 1852, traffic on the Oriel Canal fell, and the "
            "last commercial boat passed through its locks in 1911.\n"
            "Passage 3: Volunteers reopened six miles of the canal for pleasure boats in 1989.\n\n"
            "Question: What was the Oriel Canal built to carry, and when did commercial traffic end?"
        ],
    },
    {
        "question_id": "qd-rag-2",
        "category": "rag",
        "turns": [
            "Answer the question using the passages.\n\n"
            "Passage 1: The mountain hare changes its coat from brown in summer to white in winter, which "
            "hides it against snow.\n"
            "Passage 2: The moult is triggered mainly by day length, not by temperature, so in years with "
            "little snow the white hares stand out against bare ground.\n\n"
            "Question: What triggers the mountain hare's change of coat, and why can that be a problem?"
        ],
    },
    {
        "question_id": "qd-rag-3",
        "category": "rag",
        "turns": [
            "Answer the question using the passages.\n\n"
            "Passage 1: The town of Harrowgate Sands holds a kite festival every August on its north beach.\n"
            "Passage 2: The festival began in 1978 as a contest between two schools and now draws visitors "
            "from across the country.\n"
            "Passage 3: Since 2015 the festival has banned kites with metal lines after one touched a power "
            "cable.\n\n"
            "Question: How did the kite festival start, and what rule was added in 2015?"
        ],
    },
]

#: Used for each method's warm-up generation; never part of the timed set.
WARMUP_PROMPT = "List five colours and one thing that usually has each colour."
