"""Regenerate the shipped task suite (train/suite/) in MetaICL format from real data on this machine.

Sources (nothing is downloaded):
- WordNet 3.0 database files of the Debian package `wordnet-base` (/usr/share/wordnet: data.*, *.exc,
  cntlist.rev): lexical categories, parts of speech, hypernyms, meronyms, synonyms, antonyms, entailment,
  cause, derivation, verb frames, glosses and example sentences.
- the Unicode Character Database as shipped in Python's `unicodedata` (names, categories, case pairs);
- the time-zone tables of the Debian package `tzdata` (/usr/share/zoneinfo/zone.tab, iso3166.tab):
  cities, countries, coordinates.
The Unicode and time-zone tasks form the "unseen domains": no setting trains on them.

Output (written to a temporary folder, then swapped in, so a failure leaves the old suite intact):
    {task}/{task}_16384_100_train.jsonl     the training pool (<= POOL_CAP examples)
    {task}/{task}_16_{seed}_train.jsonl     16 demonstrations drawn from the pool, seeds 100,13,21,42,87
    {task}/{task}_16_{seed}_test.jsonl      the test queries (the same for every seed, disjoint from the pool)
    settings/{setting}.json                 the seven MetaICL settings' analogues
    tasks.json                              {task: {"type", "domain", "source", "available"}}

    python train/build_suite.py [--wordnet /usr/share/wordnet] [--zoneinfo /usr/share/zoneinfo] [--out DIR]
Generation is deterministic (fixed seeds, sorted inputs).
"""
from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
import tempfile
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

SEEDS = (100, 13, 21, 42, 87)
K = 16
POOL_CAP = 200       # training examples per task (MetaICL's pools are larger; the repo stays small)
TEST_CAP = 200       # test queries per task: enough to pair per-query scores across models (issue 13)
MAX_TEXT = 150       # characters: keeps 16-shot prompts within ~1024 tokens
OUT_DEFAULT = Path(__file__).resolve().parent / "suite"

LEXNAMES = [  # WordNet's lexnames file (lex_filenum -> name); Debian's wordnet-base does not ship it
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food",
    "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon",
    "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape",
    "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
    "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl"]
POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
POS_NAME = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
SS_TYPE_NUM = {"n": 1, "v": 2, "a": 3, "r": 4, "s": 5}
OBJECT_FRAMES = {8, 9, 10, 11, 14, 15, 16, 17, 18, 19, 20, 21, 24, 25, 26, 28, 29, 30, 31, 32, 33, 34, 35}


# --- WordNet ---------------------------------------------------------------------------------------
@dataclass
class Synset:
    key: tuple          # (file pos, offset)
    pos: str            # n v a s r
    lexname: str
    words: list         # lemmas, spaces for underscores, adjective markers removed
    lex_ids: list
    ptrs: list          # (symbol, target key)
    frames: set
    definition: str
    examples: list
    freq: int = 0       # SemCor tag count of its senses (cntlist.rev): how common the synset is

    def rel(self, *symbols):
        return [k for s, k in self.ptrs if s in symbols]


@dataclass
class WordNet:
    synsets: dict = field(default_factory=dict)
    exc: dict = field(default_factory=dict)      # pos file -> [(inflected, base)]

    def of(self, pos: str, min_freq: int = 1):
        return [s for s in self.synsets.values() if s.pos in pos and s.freq >= min_freq]


def _file_pos(pos: str) -> str:
    return "a" if pos == "s" else pos


def parse_data_line(line: str) -> Synset:
    head, _, gloss = line.partition(" | ")
    f = head.split()
    offset, lexnum, pos, w_cnt = int(f[0]), int(f[1]), f[2], int(f[3], 16)
    i = 4
    words, lex_ids = [], []
    for _ in range(w_cnt):
        words.append(re.sub(r"\([a-z]+\)$", "", f[i]).replace("_", " "))
        lex_ids.append(int(f[i + 1], 16))
        i += 2
    p_cnt = int(f[i]); i += 1
    ptrs = []
    for _ in range(p_cnt):
        sym, off, ppos = f[i], int(f[i + 1]), f[i + 2]
        ptrs.append((sym, (_file_pos(ppos), off)))
        i += 4
    frames = set()
    if pos == "v" and i < len(f):
        f_cnt = int(f[i]); i += 1
        for _ in range(f_cnt):
            frames.add(int(f[i + 1])); i += 3
    gloss = gloss.strip()
    definition, _, rest = gloss.partition('; "')
    examples = re.findall(r'"([^"]+)"', '"' + rest) if rest else []
    return Synset((_file_pos(pos), offset), pos, LEXNAMES[lexnum], words, lex_ids, ptrs, frames,
                  definition.strip().rstrip(";").strip(), [e.strip() for e in examples])


def load_wordnet(root: Path) -> WordNet:
    wn = WordNet()
    for p, name in POS_FILES.items():
        path = root / f"data.{name}"
        if not path.is_file():
            raise SystemExit(f"{path} not found: install WordNet (apt-get install wordnet-base) or pass --wordnet")
        with open(path, encoding="latin-1") as fh:
            for line in fh:
                if line.startswith("  "):
                    continue  # license header
                s = parse_data_line(line)
                wn.synsets[s.key] = s
        exc = root / f"{name}.exc"
        if exc.is_file():
            wn.exc[p] = [tuple(l.split()[:2]) for l in exc.read_text(encoding="latin-1").splitlines()
                         if len(l.split()) >= 2]
    # frequencies: sense key lemma%ss_type:lex_filenum:lex_id:head:head_id -> tag count
    counts = defaultdict(int)
    cnt = root / "cntlist.rev"
    if cnt.is_file():
        for line in cnt.read_text(encoding="latin-1").splitlines():
            key, _, tag = line.split()
            lemma, _, rest = key.partition("%")
            ss, lexnum, lexid = rest.split(":")[:3]
            counts[(lemma, int(ss), int(lexnum), int(lexid))] += int(tag)
    for s in wn.synsets.values():
        lexnum = LEXNAMES.index(s.lexname)
        s.freq = sum(counts.get((w.replace(" ", "_").lower(), SS_TYPE_NUM[s.pos], lexnum, lid), 0)
                     for w, lid in zip(s.words, s.lex_ids))
    return wn


# --- helpers ---------------------------------------------------------------------------------------
def ok_text(t: str) -> bool:
    return 0 < len(t) <= MAX_TEXT


def word_ok(w: str) -> bool:
    return w.isascii() and re.fullmatch(r"[a-z][a-z \-']*", w) is not None and len(w) <= 25


def words_of(s: Synset) -> list:
    return [w for w in dict.fromkeys(s.words) if word_ok(w)]


def art(word: str) -> str:
    """The word with its indefinite article."""
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def ex(inp: str, out: str, options=()) -> dict:
    return {"input": inp, "output": out, "options": list(options)}


def mc(rng: random.Random, inp: str, answer: str, pool: list, exclude: set, n: int = 4) -> dict | None:
    """A multiple-choice example: the answer plus n-1 distinct distractors drawn from pool (none in exclude)."""
    opts, tries = {answer}, 0
    while len(opts) < n and tries < 50 * n and pool:
        w = pool[rng.randrange(len(pool))]  # rejection sampling: pools are large, exclusions few
        if w not in exclude:
            opts.add(w)
        tries += 1
    if len(opts) < n:
        return None
    opts = sorted(opts)
    rng.shuffle(opts)
    return ex(inp, answer, opts)


def inflections(w: str, exc_v: dict) -> list:
    forms = {w, w + "s", w + "es", w + "ed", w + "d", w + "ing", w[:-1] + "ing" if w.endswith("e") else w,
             w + w[-1] + "ed", w + w[-1] + "ing", w[:-1] + "ies" if w.endswith("y") else w,
             w[:-1] + "ied" if w.endswith("y") else w}
    forms |= set(exc_v.get(w, []))
    return sorted(forms, key=len, reverse=True)


def blank(sentence: str, forms: list) -> str | None:
    for f in forms:
        pat = re.compile(r"\b" + re.escape(f) + r"\b", re.IGNORECASE)
        if pat.search(sentence):
            return pat.sub("___", sentence, count=1)
    return None


# --- the task generators ---------------------------------------------------------------------------
# each returns (type, domain, source, candidate examples); candidates are shuffled and capped later.
def wordnet_tasks(wn: WordNet) -> dict:
    S = wn.synsets
    rng = random.Random(1234)
    T = {}
    src = "WordNet 3.0 (Debian wordnet-base)"
    nouns, verbs = wn.of("n"), wn.of("v")
    adjs, advs = wn.of("as"), wn.of("r")
    by_lex = defaultdict(list)
    for s in nouns + verbs + adjs + advs:
        by_lex[s.lexname].append(s)
    lex_words = {lex: [words_of(o)[0] for o in syns if words_of(o)] for lex, syns in by_lex.items()}
    lex_glosses = {lex: [o.definition for o in syns if ok_text(o.definition)] for lex, syns in by_lex.items()}

    def first(s):
        w = words_of(s)
        return w[0] if w else None

    def cls(name, domain, pairs, labels):
        T[name] = ("classification", domain, src, [ex(i, o, labels) for i, o in pairs])

    # lexical category of a gloss
    noun_cats = ["animal", "artifact", "person", "plant", "food", "body", "location", "substance"]
    cls("noun_category", "wordnet-noun",
        [(s.definition, s.lexname.split(".")[1]) for s in nouns
         if s.lexname.split(".")[1] in noun_cats and ok_text(s.definition)], noun_cats)
    verb_cats = ["motion", "communication", "contact", "change", "cognition", "consumption", "perception",
                 "possession"]
    cls("verb_category", "wordnet-verb",
        [(s.definition, s.lexname.split(".")[1]) for s in verbs
         if s.lexname.split(".")[1] in verb_cats and ok_text(s.definition)], verb_cats)
    adj_kind = {"adj.all": "descriptive", "adj.pert": "relational", "adj.ppl": "participial"}
    cls("adjective_kind", "wordnet-adjective",
        [(f"{first(s)}: {s.definition}", adj_kind[s.lexname]) for s in wn.of("as", 0)
         if first(s) and ok_text(s.definition)], sorted(adj_kind.values()))
    pos_labels = ["noun", "verb", "adjective", "adverb"]
    cls("gloss_pos", "wordnet-mixed",
        [(s.definition, POS_NAME[s.pos]) for s in nouns + verbs + adjs + advs if ok_text(s.definition)],
        pos_labels)
    pairs = []
    for s in nouns + verbs + adjs + advs:
        w = first(s)
        for e in s.examples[:1]:
            if w and ok_text(e) and re.search(r"\b" + re.escape(w) + r"\b", e):
                pairs.append((f'In "{e}", the word "{w}" is a', POS_NAME[s.pos]))
    cls("word_pos", "wordnet-mixed", pairs, pos_labels)

    def ancestors(s, seen=None):
        seen = set() if seen is None else seen
        for k in s.rel("@", "@i"):
            if k not in seen:
                seen.add(k)
                ancestors(S[k], seen)
        return seen

    def find(word, pos):
        return [s for s in S.values() if s.pos == pos and word in s.words]

    organism = {s.key for s in find("organism", "n") if "living thing" in s.definition or "living" in
                s.definition}
    abstraction = {s.key for s in find("abstraction", "n") if s.lexname == "noun.Tops"}
    physical = {s.key for s in find("physical entity", "n")}
    cls("living_thing", "wordnet-noun",
        [(f"{first(s)}: {s.definition}", "living" if ancestors(s) & organism else "not living")
         for s in nouns if first(s) and ok_text(s.definition)], ["living", "not living"])
    pairs = []
    for s in nouns:
        a = ancestors(s)
        if first(s) and ok_text(s.definition) and bool(a & abstraction) != bool(a & physical):
            pairs.append((f"{first(s)}: {s.definition}", "abstract" if a & abstraction else "physical"))
    cls("abstract_or_physical", "wordnet-noun", pairs, ["abstract", "physical"])
    sense_count = defaultdict(int)
    for s in S.values():
        for w in set(s.words):
            sense_count[w] += 1
    common_words = sorted({w for s in nouns + verbs + adjs + advs for w in words_of(s)})
    cls("word_polysemy", "wordnet-mixed",
        [(w, "one sense" if sense_count[w] == 1 else "a few senses" if sense_count[w] <= 4 else "many senses")
         for w in common_words], ["one sense", "a few senses", "many senses"])
    pairs = []
    for s in verbs:
        w = first(s)
        if w and s.frames and ok_text(s.definition):
            pairs.append((f"{w}: {s.definition}", "transitive" if s.frames & OBJECT_FRAMES else "intransitive"))
    cls("verb_transitivity", "wordnet-verb", pairs, ["transitive", "intransitive"])
    cls("adverb_origin", "wordnet-adverb",
        [(f"{first(s)}: {s.definition}", "from an adjective" if s.rel("\\") else "not from an adjective")
         for s in wn.of("r", 0) if first(s) and ok_text(s.definition)],
        ["from an adjective", "not from an adjective"])
    pairs = []
    for s in wn.of("n", 0):
        w = s.words[0]
        if ok_text(s.definition) and re.fullmatch(r"[A-Za-z][A-Za-z .\-']*", w) and len(w) <= 25:
            pairs.append((f"{w}: {s.definition}", "specific" if s.rel("@i") else "general"))
    cls("noun_instance", "wordnet-noun", pairs, ["specific", "general"])

    # NLI-like
    def nli(name, domain, pairs, labels):
        T[name] = ("nli", domain, src, [ex(i, o, labels) for i, o in pairs])

    three = []
    for s in nouns:
        x = first(s)
        hyp = [S[k] for k in s.rel("@")]
        if not x or not hyp:
            continue
        anc = [S[k] for k in sorted(ancestors(s)) if first(S[k]) and S[k].lexname != "noun.Tops"]
        sib = [S[k] for h in hyp for k in h.rel("~") if k != s.key and first(S[k]) and S[k].freq > 0]
        kids = [S[k] for k in s.rel("~") if first(S[k])]
        opts = []
        if anc:
            opts.append((rng.choice(anc), "entailment"))
        if sib:
            opts.append((rng.choice(sib), "contradiction"))
        if kids:
            opts.append((rng.choice(kids), "neutral"))
        if opts:
            y, lab = rng.choice(opts)
            if first(y) != x:
                three.append((f"Premise: This is {art(x)}. Hypothesis: This is {art(first(y))}.", lab))
    nli("nli_noun_hypernym", "wordnet-noun", three, ["entailment", "neutral", "contradiction"])
    pairs = []
    for s in nouns:
        x = first(s)
        anc = [S[k] for k in sorted(ancestors(s)) if first(S[k]) and S[k].lexname != "noun.Tops"]
        if not x or not anc:
            continue
        if rng.random() < 0.5:
            pairs.append((f"Is {art(x)} a kind of {first(rng.choice(anc))}?", "yes"))
        else:
            other = rng.choice(nouns)
            if other.lexname != s.lexname and first(other) and other.key not in ancestors(s):
                pairs.append((f"Is {art(x)} a kind of {first(other)}?", "no"))
    nli("nli_noun_kind_of", "wordnet-noun", pairs, ["yes", "no"])

    def rel_pairs(syns, symbol, template, min_freq=0, reverse_neg=True):
        out = []
        for s in syns:
            a = first(s)
            for k in s.rel(symbol):
                b = first(S[k])
                if a and b and a != b and S[k].freq >= min_freq:
                    if rng.random() < 0.5 or not reverse_neg:
                        out.append((template.format(a=a, b=b, a_a=art(a), a_b=art(b)), "yes"))
                    else:  # the reversed relation is the natural negative (a part is not its whole)
                        out.append((template.format(a=b, b=a, a_a=art(b), a_b=art(a)), "no"))
        return out

    nli("nli_verb_entailment", "wordnet-verb",
        rel_pairs(wn.of("v", 0), "*", "If you {a}, do you necessarily {b}?"), ["yes", "no"])
    nli("nli_verb_cause", "wordnet-verb",
        rel_pairs(wn.of("v", 0), ">", "If you {a} it, does it {b}?"), ["yes", "no"])
    nli("nli_verb_kind_of", "wordnet-verb", rel_pairs(verbs, "@", "Is to {a} a way to {b}?"), ["yes", "no"])
    nli("nli_part_of", "wordnet-noun", rel_pairs(wn.of("n", 0), "#p", "Is {a_a} part of {a_b}?"), ["yes", "no"])
    nli("nli_member_of", "wordnet-noun", rel_pairs(wn.of("n", 0), "#m", "Is {a_a} a member of {a_b}?"),
        ["yes", "no"])
    nli("nli_substance_of", "wordnet-noun", rel_pairs(wn.of("n", 0), "#s", "Is {a} a substance in {b}?"),
        ["yes", "no"])
    pairs = []
    for s in wn.of("as", 0):
        a = first(s)
        if not a:
            continue
        syn = [w for w in words_of(s) if w != a]
        ants = [first(S[k]) for k in s.rel("!") if first(S[k])]
        if syn and (not ants or rng.random() < 0.5):
            pairs.append((f"Premise: It is {a}. Hypothesis: It is {rng.choice(syn)}.", "entailment"))
        elif ants:
            pairs.append((f"Premise: It is {a}. Hypothesis: It is {rng.choice(ants)}.", "contradiction"))
    nli("nli_adjective", "wordnet-adjective", pairs, ["entailment", "contradiction"])

    # paraphrase-like
    def para(name, domain, pairs):
        T[name] = ("paraphrase", domain, src, [ex(i, o, ["equivalent", "not equivalent"]) for i, o in pairs])

    def sisters(s):
        return [S[k] for h in s.rel("@", "&") for k in S[h].rel("~", "&") if k != s.key and first(S[k])]

    def syn_pairs(syns, fmt="{a} / {b}"):
        out = []
        for s in syns:
            ws = words_of(s)
            if len(ws) < 2:
                continue
            a = ws[0]
            if rng.random() < 0.5:
                out.append((fmt.format(a=a, b=rng.choice(ws[1:])), "equivalent"))
            else:
                sis = sisters(s) or [o for o in [rng.choice(syns)] if o.key != s.key and first(o)]
                if sis:
                    b = first(rng.choice(sis))
                    if b not in ws:
                        out.append((fmt.format(a=a, b=b), "not equivalent"))
        return out

    para("para_noun_synonym", "wordnet-noun", syn_pairs(nouns))
    para("para_verb_synonym", "wordnet-verb", syn_pairs(verbs))
    para("para_adjective_synonym", "wordnet-adjective", syn_pairs(wn.of("as", 0)))
    para("para_adverb_synonym", "wordnet-adverb", syn_pairs(wn.of("r", 0)))
    exc_v = defaultdict(list)
    for infl, base in wn.exc.get("v", []):
        exc_v[base.replace("_", " ")].append(infl.replace("_", " "))

    def subst_pairs(syns, verb=False):
        out = []
        for s in syns:
            ws = words_of(s)
            if len(ws) < 2 or not s.examples:
                continue
            a = ws[0]
            e = s.examples[0]
            forms = inflections(a, exc_v) if verb else [a]
            m = next((re.search(r"\b" + re.escape(f) + r"\b", e) for f in forms
                      if re.search(r"\b" + re.escape(f) + r"\b", e)), None)
            if not m or m.group(0) != a or not ok_text(e):
                continue  # only exact lemma occurrences, so the substitute reads grammatically
            if rng.random() < 0.5:
                b, lab = rng.choice(ws[1:]), "equivalent"
            else:
                sis = sisters(s)
                if not sis:
                    continue
                b, lab = first(rng.choice(sis)), "not equivalent"
                if b in ws:
                    continue
            e2 = e[:m.start()] + b + e[m.end():]
            out.append((f"Sentence 1: {e} Sentence 2: {e2}", lab))
        return out

    para("para_noun_substitution", "wordnet-noun", subst_pairs(wn.of("n", 0)))
    para("para_verb_substitution", "wordnet-verb", subst_pairs(wn.of("v", 0), verb=True))
    para("para_adjective_substitution", "wordnet-adjective", subst_pairs(wn.of("as", 0)))
    pairs = []
    for s in nouns + verbs:
        ws = words_of(s)
        if not ws or not ok_text(s.definition):
            continue
        if rng.random() < 0.5:
            pairs.append((f"Phrase 1: {', '.join(ws[:3])} Phrase 2: {s.definition}", "equivalent"))
        else:
            sis = [o for o in sisters(s) if ok_text(o.definition) and not set(words_of(o)) & set(ws)]
            if sis:
                pairs.append((f"Phrase 1: {', '.join(ws[:3])} Phrase 2: {rng.choice(sis).definition}",
                              "not equivalent"))
    para("para_word_gloss", "wordnet-mixed", pairs)

    # multiple-choice QA
    def qa(name, domain, items):
        T[name] = ("multiple-choice", domain, src, [i for i in items if i is not None])

    for pos, name, domain in (("n", "noun", "wordnet-noun"), ("v", "verb", "wordnet-verb"),
                              ("as", "adjective", "wordnet-adjective"), ("r", "adverb", "wordnet-adverb")):
        syns = wn.of(pos)
        items = []
        for s in syns:
            w = first(s)
            if w and ok_text(s.definition):
                items.append(mc(rng, f"Which word means: {s.definition}?", w, lex_words[s.lexname], set(s.words)))
        qa(f"qa_{name}_from_gloss", domain, items)
    items = []
    hyper_pool = sorted({first(S[k]) for s in nouns for k in s.rel("@") if first(S[k])})
    for s in nouns:
        x = first(s)
        hyp = [first(S[k]) for k in s.rel("@") if first(S[k])]
        if x and hyp:
            excl = {first(S[k]) for k in ancestors(s) if first(S[k])} | set(s.words)
            items.append(mc(rng, f"{art(x).capitalize()} is a kind of", hyp[0], hyper_pool, excl))
    qa("qa_noun_hypernym", "wordnet-noun", items)
    items = []
    vhyper_pool = sorted({first(S[k]) for s in verbs for k in s.rel("@") if first(S[k])})
    for s in verbs:
        x = first(s)
        hyp = [first(S[k]) for k in s.rel("@") if first(S[k])]
        if x and hyp:
            items.append(mc(rng, f"To {x} is a way to", hyp[0], vhyper_pool, set(s.words) | set(hyp)))
    qa("qa_verb_hypernym", "wordnet-verb", items)
    items = []
    for s in nouns:
        y = first(s)
        kids = [first(S[k]) for k in s.rel("~") if first(S[k]) and S[k].freq > 0]
        if y and kids:
            excl = {w for k in s.rel("~") for w in S[k].words} | set(s.words)
            items.append(mc(rng, f"Which of these is a kind of {y}?", kids[0], lex_words[s.lexname],
                            excl | {first(S[k]) for k in ancestors(s) if first(S[k])}))
    qa("qa_noun_hyponym", "wordnet-noun", items)
    adj_pool = sorted({w for s in wn.of("as", 0) for w in words_of(s)})
    verb_pool = sorted({w for s in verbs for w in words_of(s)})
    for name, syns, pool, domain in (("qa_adjective_antonym", wn.of("as", 0), adj_pool, "wordnet-adjective"),
                                     ("qa_verb_antonym", wn.of("v", 0), verb_pool, "wordnet-verb")):
        items = []
        for s in syns:
            a = first(s)
            ants = [first(S[k]) for k in s.rel("!") if first(S[k])]
            if a and ants:
                items.append(mc(rng, f"The opposite of {a} is", ants[0], pool, set(s.words)))
        qa(name, domain, items)
    for pos, name, domain in (("n", "noun", "wordnet-noun"), ("v", "verb", "wordnet-verb"),
                              ("as", "adjective", "wordnet-adjective")):
        items = []
        for s in wn.of(pos, 0):
            w = first(s)
            if not w or not s.examples:
                continue
            b = blank(s.examples[0], inflections(w, exc_v) if pos == "v" else [w, w + "s", w + "es"])
            if b and ok_text(b):
                items.append(mc(rng, f"Fill in the blank: {b}", w, lex_words[s.lexname], set(s.words)))
        qa(f"qa_{name}_fill_in", domain, items)
    items = []
    part_pool = sorted({first(S[k]) for s in wn.of("n", 0) for k in s.rel("%p") if first(S[k])})
    for s in wn.of("n", 0):
        y = first(s)
        parts = [first(S[k]) for k in s.rel("%p") if first(S[k])]
        if y and parts:
            items.append(mc(rng, f"Which of these is a part of {art(y)}?", parts[0], part_pool,
                            set(parts) | set(s.words)))
    qa("qa_noun_meronym", "wordnet-noun", items)
    items = []
    for s in nouns + verbs:
        w = first(s)
        if not w or not ok_text(s.definition) or sense_count[w] > 1:
            continue
        items.append(mc(rng, f"What does {w} mean?", s.definition, lex_glosses[s.lexname], set(), n=3))
    qa("qa_gloss_from_word", "wordnet-mixed", items)
    items = []
    for s in nouns:
        kids = [first(S[k]) for k in s.rel("~") if first(S[k]) and S[k].freq > 0]
        if len(set(kids)) < 3:
            continue
        three_kids = rng.sample(sorted(set(kids)), 3)
        other = rng.choice(nouns)
        odd = first(other)
        if odd and other.lexname != s.lexname and odd not in kids:
            opts = three_kids + [odd]
            rng.shuffle(opts)
            items.append(ex(f"Which word does not belong: {', '.join(opts)}?", odd, opts))
    qa("qa_odd_one_out", "wordnet-noun", items)
    items = []
    for s in wn.of("n", 0):
        n = first(s)
        rel_verbs = [first(S[k]) for k in s.rel("+") if S[k].pos == "v" and first(S[k])]
        if n and rel_verbs and rel_verbs[0] != n:
            items.append(mc(rng, f"Which verb is related to the noun {n}?", rel_verbs[0], verb_pool,
                            set(rel_verbs) | set(s.words)))
    qa("qa_noun_derivation", "wordnet-noun", items)
    items = []
    for s in wn.of("s", 0):
        a = first(s)
        heads = [first(S[k]) for k in s.rel("&") if first(S[k])]
        if a and heads and heads[0] != a:
            ants = {first(S[j]) for k in s.rel("&") for j in S[k].rel("!")}
            items.append(mc(rng, f"Which word is closest in meaning to {a}?", heads[0], adj_pool,
                            set(s.words) | set(heads) | ants))
    qa("qa_similar_adjective", "wordnet-adjective", items)

    # generation (no options: training only)
    def gen(name, domain, pairs):
        T[name] = ("generation", domain, src, [ex(i, o) for i, o in pairs])

    gen("gen_noun_from_gloss", "wordnet-noun",
        [(s.definition, first(s)) for s in nouns if first(s) and ok_text(s.definition)])
    gen("gen_verb_from_gloss", "wordnet-verb",
        [(s.definition, first(s)) for s in verbs if first(s) and ok_text(s.definition)])
    gen("gen_noun_hypernym", "wordnet-noun",
        [(first(s), first(S[s.rel("@")[0]])) for s in nouns if first(s) and s.rel("@") and first(S[s.rel("@")[0]])])
    for p, name, domain in (("n", "noun", "wordnet-noun"), ("v", "verb", "wordnet-verb"),
                            ("a", "adjective", "wordnet-adjective")):
        gen(f"gen_{name}_lemma", domain,
            [(i.replace("_", " "), b.replace("_", " ")) for i, b in wn.exc.get(p, []) if word_ok(b.replace("_", " "))])
    gen("gen_synonym", "wordnet-mixed",
        [(words_of(s)[0], words_of(s)[1]) for s in nouns + verbs + adjs if len(words_of(s)) >= 2])
    gen("gen_adjective_antonym", "wordnet-adjective",
        [(first(s), first(S[s.rel("!")[0]])) for s in wn.of("a", 0)
         if first(s) and s.rel("!") and first(S[s.rel("!")[0]])])
    gen("gen_gloss", "wordnet-mixed",
        [(first(s), s.definition) for s in nouns + verbs if first(s) and ok_text(s.definition)
         and sense_count[first(s)] == 1])
    pairs = []
    for s in nouns:
        w = first(s)
        if w and s.examples:
            b = blank(s.examples[0], [w, w + "s"])
            if b and ok_text(b):
                pairs.append((b, w))
    gen("gen_noun_fill_in", "wordnet-noun", pairs)
    gen("gen_verb_nominalization", "wordnet-verb",
        [(first(s), first(S[k])) for s in verbs for k in s.rel("+")[:1]
         if first(s) and S[k].pos == "n" and first(S[k]) and first(S[k]) != first(s)])
    return T


def unicode_tasks() -> dict:
    src = f"Unicode {unicodedata.unidata_version} character database (Python unicodedata)"
    T = {}
    chars = []
    for cp in range(0x20, 0x3000):
        c = chr(cp)
        name = unicodedata.name(c, "")
        if name and not name.startswith(("CJK", "HANGUL", "<")):
            chars.append((c, name))
    major = {"L": "letter", "N": "number", "P": "punctuation", "S": "symbol"}
    T["unicode_category"] = ("classification", "unicode", src,
                             [ex(name.lower(), major[unicodedata.category(c)[0]], list(major.values()))
                              for c, name in chars if unicodedata.category(c)[0] in major])
    scripts = ["latin", "greek", "cyrillic", "arabic", "hebrew", "devanagari", "thai", "armenian"]
    T["unicode_script"] = ("classification", "unicode", src,
                           [ex(c, name.split()[0].lower(), scripts) for c, name in chars
                            if unicodedata.category(c) in ("Lu", "Ll", "Lo") and name.split()[0].lower() in scripts])
    T["unicode_case"] = ("classification", "unicode", src,
                         [ex(c, "uppercase" if unicodedata.category(c) == "Lu" else "lowercase",
                             ["uppercase", "lowercase"])
                          for c, name in chars if unicodedata.category(c) in ("Lu", "Ll") and cp_ok(c)])
    rng = random.Random(77)
    pairs = []
    letters = [(c, n) for c, n in chars if unicodedata.category(c) == "Lu" and c.lower() != c and len(c.lower()) == 1]
    lowers = [c.lower() for c, _ in letters]
    for c, name in letters:
        if rng.random() < 0.5:
            pairs.append(ex(f"Character 1: {c} Character 2: {c.lower()}", "equivalent",
                            ["equivalent", "not equivalent"]))
        else:
            same_script = [l for (u, n), l in zip(letters, lowers) if n.split()[0] == name.split()[0] and u != c]
            if same_script:
                pairs.append(ex(f"Character 1: {c} Character 2: {rng.choice(same_script)}", "not equivalent",
                                ["equivalent", "not equivalent"]))
    T["para_unicode_case_pair"] = ("paraphrase", "unicode", src, pairs)
    items = []
    by_script = defaultdict(list)
    for c, name in chars:
        if unicodedata.category(c).startswith("L"):
            by_script[name.split()[0]].append(c)
    for c, name in chars:
        if unicodedata.category(c).startswith("L") and len(by_script[name.split()[0]]) >= 4:
            items.append(mc(rng, f"Which character is {name.lower()}?", c, by_script[name.split()[0]], {c}))
    T["qa_unicode_char"] = ("multiple-choice", "unicode", src, [i for i in items if i])
    return T


def cp_ok(c: str) -> bool:
    return c.isprintable() and not c.isspace()


def geography_tasks(zoneinfo: Path) -> dict:
    zt, iso = zoneinfo / "zone.tab", zoneinfo / "iso3166.tab"
    if not zt.is_file() or not iso.is_file():
        print(f"warning: {zt} or {iso} missing (apt-get install tzdata): no geography tasks", file=sys.stderr)
        return {}
    src = "IANA time zone tables (Debian tzdata: zone.tab, iso3166.tab)"
    countries = dict(l.split("\t")[:2] for l in iso.read_text().splitlines() if l and not l.startswith("#"))
    rows = []
    for l in zt.read_text().splitlines():
        if not l or l.startswith("#"):
            continue
        cc, coord, tz = l.split("\t")[:3]
        m = re.fullmatch(r"([+-]\d+)([+-]\d+)", coord)
        lat = int(m.group(1)[:3]) + int(m.group(1)[3:5]) / 60 * (1 if m.group(1)[0] == "+" else -1)
        lon = int(m.group(2)[:4]) + int(m.group(2)[4:6]) / 60 * (1 if m.group(2)[0] == "+" else -1)
        region, city = tz.split("/")[0], tz.split("/")[-1].replace("_", " ")
        rows.append((city, region, countries.get(cc, cc), lat, lon))
    regions = ["America", "Europe", "Asia", "Africa", "Pacific", "Australia"]
    T = {}
    T["city_continent"] = ("classification", "geography", src,
                           [ex(c, r, regions) for c, r, _, _, _ in rows if r in regions])
    T["city_hemisphere"] = ("classification", "geography", src,
                            [ex(c, "north" if lat >= 0 else "south", ["north", "south"]) for c, _, _, lat, _ in rows])
    T["city_east_west"] = ("classification", "geography", src,
                           [ex(c, "east" if lon >= 0 else "west", ["east", "west"]) for c, _, _, _, lon in rows])
    rng = random.Random(99)
    by_region = defaultdict(list)
    for c, r, co, _, _ in rows:
        by_region[r].append(co)
    pairs, items = [], []
    for c, r, co, _, _ in rows:
        others = sorted(set(by_region[r]) - {co})
        if rng.random() < 0.5 or not others:
            pairs.append(ex(f"Premise: The city is {c}. Hypothesis: The city is in {co}.", "entailment",
                            ["entailment", "contradiction"]))
        else:
            pairs.append(ex(f"Premise: The city is {c}. Hypothesis: The city is in {rng.choice(others)}.",
                            "contradiction", ["entailment", "contradiction"]))
        if len(others) >= 3:
            items.append(mc(rng, f"In which country is {c}?", co, others, set()))
    T["nli_city_country"] = ("nli", "geography", src, pairs)
    T["qa_city_country"] = ("multiple-choice", "geography", src, [i for i in items if i])
    return T


# --- splitting and writing -------------------------------------------------------------------------
def balanced_order(rng: random.Random, examples: list, by_label: bool) -> list:
    """Shuffle; for classification interleave the labels round-robin so any prefix is near-balanced."""
    examples = list(examples)
    rng.shuffle(examples)
    if not by_label:
        return examples
    groups = defaultdict(list)
    for e in examples:
        groups[e["output"]].append(e)
    out, labels = [], sorted(groups)
    while any(groups[l] for l in labels):
        for l in labels:
            if groups[l]:
                out.append(groups[l].pop())
    return out


def split_task(name: str, kind: str, examples: list) -> tuple[list, list]:
    """(pool, test): test first (near-balanced for classification), pool = the rest, both capped. The test set
    takes a third of the examples, or more while the pool keeps POOL_CAP, up to TEST_CAP."""
    seen, uniq = set(), []
    for e in sorted(examples, key=lambda e: (e["input"], e["output"])):
        if e["input"] not in seen:  # one answer per input
            seen.add(e["input"])
            uniq.append(e)
    rng = random.Random(f"suite:{name}")
    order = balanced_order(rng, uniq, kind in ("classification", "nli", "paraphrase"))
    if kind == "generation":
        return order[:POOL_CAP], []
    n_test = min(TEST_CAP, max(len(order) // 3, len(order) - POOL_CAP))
    return order[n_test:n_test + POOL_CAP], order[:n_test]


def settings(meta: dict) -> dict:
    """The seven MetaICL settings' analogues. Unseen-domain tasks (unicode, geography) are never trained on."""
    unseen = {"unicode", "geography"}
    W = sorted(t for t, m in meta.items() if m["domain"] not in unseen)
    U = sorted(t for t, m in meta.items() if m["domain"] in unseen)
    typ = {t: m["type"] for t, m in meta.items()}
    CLS = ("classification", "nli", "paraphrase")
    # explicit choices, mixing the three classification-like types and the five tested skills
    class_test = ["noun_category", "verb_transitivity", "word_polysemy", "nli_noun_hypernym", "nli_verb_cause",
                  "para_adjective_synonym", "para_verb_substitution"]
    qa_test = ["qa_verb_from_gloss", "qa_noun_hypernym", "qa_adjective_antonym", "qa_verb_fill_in",
               "qa_odd_one_out", "qa_similar_adjective"]
    class_test = [t for t in class_test if t in meta]
    qa_test = [t for t in qa_test if t in meta]
    nli_test = [t for t in W if typ[t] == "nli"]
    para_test = [t for t in W if typ[t] == "paraphrase"]
    with_options = [t for t in W if typ[t] != "generation"]
    # hr -> lr: the option tasks with the smallest natural pools are the low-resource test tasks
    lr_test = sorted(sorted(with_options, key=lambda t: (meta[t]["available"], t))[:8])

    def s(train, test, udt):
        assert not set(train) & set(test), (train, test)
        return {"train": sorted(train), "test": sorted(test), "unseen_domain_test": sorted(udt)}

    u_cls = [t for t in U if typ[t] in CLS]
    u_qa = [t for t in U if typ[t] == "multiple-choice"]
    return {
        "hr_to_lr": s([t for t in W if t not in lr_test], lr_test, [t for t in U if typ[t] != "generation"]),
        "class_to_class": s([t for t in W if typ[t] in CLS and t not in class_test], class_test, u_cls),
        "non_class_to_class": s([t for t in W if typ[t] not in CLS], class_test, u_cls),
        "qa_to_qa": s([t for t in W if typ[t] == "multiple-choice" and t not in qa_test], qa_test, u_qa),
        "non_qa_to_qa": s([t for t in W if typ[t] != "multiple-choice"], qa_test, u_qa),
        "non_nli_to_nli": s([t for t in W if typ[t] not in ("nli", "paraphrase")], nli_test,
                            [t for t in U if typ[t] == "nli"]),
        "non_paraphrase_to_paraphrase": s([t for t in W if typ[t] not in ("nli", "paraphrase")], para_test,
                                          [t for t in U if typ[t] == "paraphrase"]),
    }


def write_jsonl(path: Path, task: str, rows: list) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"task": task, "input": r["input"], "output": r["output"],
                                "options": r["options"]}, ensure_ascii=False) + "\n")


def build(out: Path, wordnet: Path, zoneinfo: Path) -> dict:
    wn = load_wordnet(wordnet)
    tasks = {**wordnet_tasks(wn), **unicode_tasks(), **geography_tasks(zoneinfo)}
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".suite-", dir=out.parent))
    try:
        meta = {}
        for name in sorted(tasks):
            kind, domain, src, examples = tasks[name]
            for e in examples:  # the invariant data.py checks, caught here at the source
                assert not e["options"] or e["output"] in e["options"], (name, e)
            pool, test = split_task(name, kind, examples)
            if len(pool) < 2 * K or (kind != "generation" and len(test) < 20):
                print(f"skip {name}: {len(pool)} pool / {len(test)} test examples", file=sys.stderr)
                continue
            d = tmp / name
            d.mkdir()
            write_jsonl(d / f"{name}_16384_100_train.jsonl", name, pool)
            if test:
                for seed in SEEDS:
                    demos = random.Random(seed).sample(pool, K)
                    write_jsonl(d / f"{name}_{K}_{seed}_train.jsonl", name, demos)
                    write_jsonl(d / f"{name}_{K}_{seed}_test.jsonl", name, test)
            meta[name] = {"type": kind, "domain": domain, "source": src, "available": len(examples),
                          "train": len(pool), "test": len(test)}
        (tmp / "tasks.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        (tmp / "settings").mkdir()
        for sname, sval in settings(meta).items():
            (tmp / "settings" / f"{sname}.json").write_text(json.dumps(sval, indent=1) + "\n")
        (tmp / "README.md").write_text(README.format(n=len(meta)))
        old = out.with_name(out.name + ".old")
        if out.exists():
            out.rename(old)
        tmp.rename(out)  # the swap: readers see the old suite or the new one, never a partial one
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


README = """# The shipped task suite ({n} tasks, MetaICL format)

Generated by `python train/build_suite.py` from WordNet 3.0 (Debian `wordnet-base`), Python's Unicode
character database and the IANA time-zone tables (Debian `tzdata`). Do not edit by hand.
`tasks.json` gives each task's type and domain; `settings/` the seven MetaICL settings' analogues.
The `unicode` and `geography` domains are never trained on: they are the `unseen_domain_test` tasks.
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"))
    p.add_argument("--zoneinfo", type=Path, default=Path("/usr/share/zoneinfo"))
    p.add_argument("--out", type=Path, default=OUT_DEFAULT)
    args = p.parse_args(argv)
    meta = build(args.out, args.wordnet, args.zoneinfo)
    kinds = defaultdict(int)
    for m in meta.values():
        kinds[m["type"]] += 1
    print(f"wrote {len(meta)} tasks to {args.out}: " + ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())))


if __name__ == "__main__":
    main()
