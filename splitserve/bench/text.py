"""Seeded prompt text whose token count is predictable on any server's tokenizer.

Prompts are space-separated words drawn from WORDS: common lowercase English words that
byte-level BPE and SentencePiece vocabularies of 32k+ entries each hold as one token when
preceded by a space. So a prompt of n words is ~n tokens on every engine. Measured on
SmolLM2's tokenizer (49k BPE): every word below is exactly one token and 1,000 random words
encode to 1,000 tokens; servers add their own BOS / chat-template tokens on top. This is an
approximation for other tokenizers (expect within a few percent); the server's reported
`usage.prompt_tokens` is what the results use whenever the server reports it.
"""

from __future__ import annotations

import random

WORDS: tuple[str, ...] = tuple("""
the of and to in is that for it as was with be by on not he this are or his from at which
but have an they you were her she there been one all we their has would when if so no will
more can about said what some up out them into other time new than only its two may first
then do any like my now over such our man me even most made after also did many before must
through back years where much your way well down should because each just those people how
too little state good very make world still own see men work long get here between both life
being under never day same another know while last might great old year off come since
against go came right used take three states himself few house use during without again
place around however home small found thought went say part once general high upon school
every does got left number course war until always away something fact though water less
public put think almost hand enough far took head yet government system better set told
nothing night end why called find look asked later point knew city next program business
give group toward young days let room president side social given present several order
national possible rather second face per among form important often things looked early
white case become large big need four within felt along children saw best church ever least
power development light thing seemed family interest want members mind country area others
done turned although open service certain kind problem began different door thus help sense
means whole matter perhaps itself times law human line above name example action company
hands local show whether five history gave today either act feet across taken past quite
anything having seen death experience body word half really week free car field
""".split())


def words(rng: random.Random, num_words: int) -> str:
    """`num_words` seeded words joined by spaces (~num_words tokens)."""
    return " ".join(rng.choices(WORDS, k=num_words))


def count_words(text: str) -> int:
    """The token-count estimate for text we did not build (datasets): its word count."""
    return len(text.split())
