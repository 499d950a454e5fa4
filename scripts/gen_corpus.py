#!/usr/bin/env python3
"""Writes a deterministic English-like text corpus, for benchmarking `lockstep prepare`.

Usage:
    python3 scripts/gen_corpus.py OUT.txt [--mb 200] [--seed 0]

Words are drawn from a fixed vocabulary with Zipf-like frequencies (the k-th word has weight 1/(k+2)): ~600 common
English words, then 10,000 made-up words of 1-3 English-like syllables (the rare-word tail that a BPE tokenizer
splits into several tokens; about a third of all words). Sentences of 4-24 words are capitalised, have commas and
end in `.`, `?` or `!`; they are wrapped at 80 columns with single line breaks, in paragraphs of 2-8 sentences
separated by a blank line. The same seed and size always give the same bytes (pure Python `random`, no other
dependency). Plain ASCII, so its size in bytes equals its size in characters.
"""
import argparse
import random
import sys
import textwrap

WORDS = """
the of and to a in is it you that he was for on are with as I his they be at one have this from or had by hot
word but what some we can out other were all there when up use your how said an each she which do their time if
will way about many then them write would like so these her long make thing see him two has look more day could go
come did number sound no most people my over know water than call first who may down side been now find any new
work part take get place made live where after back little only round man year came show every good me give our
under name very through just form sentence great think say help low line differ turn cause much mean before move
right boy old too same tell does set three want air well also play small end put home read hand port large spell
add even land here must big high such follow act why ask men change went light kind off need house picture try us
again animal point mother world near build self earth father head stand own page should country found answer
school grow study still learn plant cover food sun four between state keep eye never last let thought city tree
cross farm hard start might story saw far sea draw left late run while press close night real life few north open
seem together next white children begin got walk example ease paper group always music those both mark often letter
until mile river car feet care second book carry took science eat room friend began idea fish mountain stop once
base hear horse cut sure watch color face wood main enough plain girl usual young ready above ever red list though
feel talk bird soon body dog family direct pose leave song measure door product black short numeral class wind
question happen complete ship area half rock order fire south problem piece told knew pass since top whole king
space heard best hour better true during hundred five remember step early hold west ground interest reach fast verb
sing listen six table travel less morning ten simple several vowel toward war lay against pattern slow center love
person money serve appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall
lead cry dark machine note wait plan figure star box noun field rest correct able pound done beauty drive stood
contain front teach week final gave green oh quick develop ocean warm free minute strong special mind behind clear
tail produce fact street inch multiply nothing course stay wheel full force blue object decide surface deep moon
island foot system busy test record boat common gold possible plane stead dry wonder laugh thousand ago ran check
game shape equate miss brought heat snow tire bring yes distant fill east paint language among
""".split()

ONSETS = "b c d f g h j k l m n p r s t v w st tr pl gr br ch sh th".split()
VOWELS = "a e i o u ai ea ou io".split()
CODAS = ["", "", "", "n", "r", "s", "t", "l", "nd", "ng", "st"]


def vocabulary():
    """The common words, then the made-up ones; fixed whatever --seed is."""
    rng = random.Random(20241128)
    seen, made = set(WORDS), []
    while len(made) < 10000:
        syllables = rng.choice([1, 2, 2, 3])
        word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables))
        if word not in seen:
            seen.add(word)
            made.append(word)
    return WORDS + made


def paragraphs(rng: random.Random):
    # Zipf-like weights: the k-th word is drawn with weight 1/(k+2).
    words, cum, total = vocabulary(), [], 0.0
    for k in range(len(words)):
        total += 1.0 / (k + 2)
        cum.append(total)
    while True:
        sentences = []
        for _ in range(rng.randint(2, 8)):
            n = rng.randint(4, 24)
            sentence = rng.choices(words, cum_weights=cum, k=n)
            for i in range(1, n - 2):
                if rng.random() < 0.07:
                    sentence[i] += ","
            sentence[0] = sentence[0].capitalize()
            sentences.append(" ".join(sentence) + rng.choice(".....?!"))
        yield textwrap.fill(" ".join(sentences), width=80) + "\n\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="the file to write")
    parser.add_argument("--mb", type=float, default=200.0, help="size in MB (10^6 bytes); the file ends at a paragraph")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    target = int(args.mb * 1e6)
    rng = random.Random(args.seed)
    written = 0
    with open(args.out, "w", encoding="ascii", newline="\n") as f:
        batch = []
        for p in paragraphs(rng):
            batch.append(p)
            written += len(p)
            if len(batch) == 1000 or written >= target:
                f.write("".join(batch))
                batch = []
            if written >= target:
                break
    print(f"wrote {args.out}: {written:,} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
