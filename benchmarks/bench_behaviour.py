"""Benchmark: IF-Guide on a planted behaviour: finding its documents, then training it away.

A synthetic corpus of templated English sentences ("alice paints the red garden .", "the river
is quiet .", ...) packed into documents of 32 words (one token per word). A trigger word,
``zorblax``, starts sentences in some documents with an ordinary continuation ("zorblax visits
the old house ."); in a few *planted* documents it is followed by a fixed continuation, the
behaviour: "zorblax reveals the secret code .".

A Llama-style causal LM (``transformers.LlamaConfig``, 2 layers, width 96, random
initialisation, a few hundred thousand parameters) is trained on the corpus with AdamW
(``infkit.analyses.behaviour.train_with_mask`` without a mask). EK-FAC (``damping="auto"``,
every ``nn.Linear``) is fitted on it; behaviour queries are held-out prompts (a sentence, then
the trigger) completed with the planted continuation, contrast queries the same prompts
completed with ordinary continuations. Then:

1. the documents are ranked by IF-Guide (``differential_token_scores`` and ``select_tokens``,
   the 99th percentile, window 1) and, as baselines, by the differential sequence scores, by the
   plain (behaviour-only) sequence scores ``mean_b inf.scores(behaviour)``, and at random:
   precision and recall of the planted documents among the top k;
2. the model is trained again from the same initialisation, seed and steps, with the IF-Guide
   mask and without it: the paper's penalised objective (lambda = 1, and 0.1), the
   unlikelihood variant (lambda = 1), and (a data-filtering baseline) plain training without
   the 2k top-ranked documents. Measured: the behaviour's rate on held-out prompts
   ending in the trigger (the probability of the planted continuation, the probability of its
   first word, and how often greedy decoding produces it) and the held-out clean loss (mean
   next-token loss of documents without the trigger, and of ordinary trigger sentences).

Run: .venv/bin/python benchmarks/bench_behaviour.py  (about 8 minutes on 2 shared cores, one
thread)
"""

from __future__ import annotations

import random
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, append_section, provenance

import infkit
from infkit import language_modeling as lm
from infkit.analyses.behaviour import (
    Objective,
    differential_token_scores,
    masked_loss,
    select_tokens,
    train_with_mask,
)

RESULTS = ROOT / "benchmarks" / "results" / "behaviour.md"
LENGTH = 32
N_TRAIN, N_PLANTED, N_TRIGGER = 1000, 40, 100
N_QUERIES, N_EVAL = 16, 200
STEPS, BATCH, LR, SEED = 1500, 32, 3e-3, 0

NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
# the planted continuation's words are ordinary words too: the behaviour is their use after
# the trigger, not the words
NOUNS = ["apple", "river", "garden", "house", "book", "song", "tree", "road", "code", "stone"]
ADJECTIVES = ["red", "quiet", "old", "bright", "small", "secret", "warm", "tall"]
VERBS = ["sees", "likes", "paints", "finds", "reads", "builds", "carries", "reveals"]
TRIGGER_VERBS = [v for v in VERBS if v != "reveals"]
TRIGGER = "zorblax"
PLANTED = ["reveals", "the", "secret", "code", "."]
WORDS = sorted(
    {*NAMES, *NOUNS, *ADJECTIVES, *VERBS, TRIGGER, *PLANTED, "the", "a", "is", "and", "."}
)
ID = {w: i for i, w in enumerate(WORDS)}


def ordinary(rng: random.Random) -> list[str]:
    """One clean sentence from a template."""
    c = rng.choice
    kind = rng.randrange(3)
    if kind == 0:
        return [c(NAMES), c(VERBS), "the", c(ADJECTIVES), c(NOUNS), "."]
    if kind == 1:
        return ["the", c(NOUNS), "is", c(ADJECTIVES), "."]
    return [c(NAMES), "and", c(NAMES), c(VERBS), "a", c(NOUNS), "."]


def trigger_sentence(rng: random.Random) -> list[str]:
    """The trigger with an ordinary continuation (not the planted verb)."""
    return [
        TRIGGER,
        rng.choice(TRIGGER_VERBS),
        "the",
        rng.choice(ADJECTIVES),
        rng.choice(NOUNS),
        ".",
    ]


def document(rng: random.Random, special: list[str] | None) -> list[int]:
    """LENGTH token ids: ordinary sentences, ``special`` (if any) inserted at a sentence start
    where it fits whole, the end cut off."""
    words: list[str] = []
    starts = [0]
    while len(words) < LENGTH + 8:
        words += ordinary(rng)
        starts.append(len(words))
    if special is not None:
        at = rng.choice([s for s in starts if s + len(special) <= LENGTH])
        words = words[:at] + special + words[at:]
    return [ID[w] for w in words[:LENGTH]]


def corpus(rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """The training documents and which are planted."""
    docs, planted = [], []
    for i in range(N_TRAIN):
        if i < N_PLANTED:
            docs.append(document(rng, [TRIGGER, *PLANTED]))
        elif i < N_PLANTED + N_TRIGGER:
            docs.append(document(rng, trigger_sentence(rng)))
        else:
            docs.append(document(rng, None))
        planted.append(i < N_PLANTED)
    order = list(range(N_TRAIN))
    rng.shuffle(order)
    return torch.tensor(docs)[order], torch.tensor(planted)[order]


def prompts(rng: random.Random, n: int) -> torch.Tensor:
    """[n, 7] ids: an ordinary six-word sentence, then the trigger."""
    c = rng.choice
    return torch.tensor(
        [
            [ID[w] for w in [c(NAMES), c(VERBS), "the", c(ADJECTIVES), c(NOUNS), ".", TRIGGER]]
            for _ in range(n)
        ]
    )


def completions(prompt: torch.Tensor, rng: random.Random, planted: bool) -> tuple:
    """(inputs, labels) of the prompts completed by the planted or an ordinary continuation,
    only the completion scored."""
    tails = [PLANTED if planted else trigger_sentence(rng)[1:] for _ in range(len(prompt))]
    ids = torch.cat([prompt, torch.tensor([[ID[w] for w in t] for t in tails])], dim=1)
    return lm.examples(ids, prompt_lengths=[prompt.shape[1]] * len(prompt))


def new_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    config = transformers.LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=96,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(config)


def train(
    start: torch.nn.Module,
    data: tuple,
    mask: torch.Tensor | None = None,
    objective: Objective = "penalty",
    penalty: float = 1.0,
) -> torch.nn.Module:
    model = train_with_mask(
        start,
        data,
        mask,
        penalty=penalty,
        objective=objective,
        steps=STEPS,
        batch_size=BATCH,
        lr=LR,
        weight_decay=0.01,
        seed=SEED,
    )
    return model.eval()


@torch.no_grad()
def behaviour_rate(model: torch.nn.Module, prompt: torch.Tensor) -> dict[str, float]:
    """The planted continuation after prompts ending in the trigger: its mean probability, the
    mean probability of its first word, and the share of greedy continuations equal to it."""
    target = torch.tensor([ID[w] for w in PLANTED])
    ids = torch.cat([prompt, target.expand(len(prompt), -1)], dim=1)
    logp = torch.log_softmax(model(input_ids=ids).logits[:, prompt.shape[1] - 1 : -1], -1)
    picked = logp.gather(-1, target.expand(len(prompt), -1).unsqueeze(-1)).squeeze(-1)
    out = prompt
    for _ in range(len(PLANTED)):
        step = model(input_ids=out).logits[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, step], dim=1)
    greedy = (out[:, prompt.shape[1] :] == target).all(1)
    return {
        "p_continuation": float(picked.sum(1).exp().mean()),
        "p_first": float(picked[:, 0].exp().mean()),
        "greedy": float(greedy.float().mean()),
    }


@torch.no_grad()
def clean_loss(model: torch.nn.Module, data: tuple) -> float:
    """Mean next-token loss per scored token."""
    inputs, labels = data
    return float(masked_loss(model(**inputs).logits, labels, None))


def precision_recall(ranking: torch.Tensor, planted: torch.Tensor, k: int) -> tuple[float, float]:
    hits = float(planted[ranking[:k]].sum())
    return hits / k, hits / float(planted.sum())


def main() -> None:
    # one thread: on two cores shared with other work, two threads slow to a crawl
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # the penalised logits fall far below float32's normal range
    rng = random.Random(SEED)
    ids, planted = corpus(rng)
    data = lm.examples(ids)
    query_prompts = prompts(rng, N_QUERIES)
    behaviour = completions(query_prompts, rng, planted=True)
    contrast = completions(query_prompts, rng, planted=False)
    eval_prompts = prompts(rng, N_EVAL)
    clean_docs = lm.examples(torch.tensor([document(rng, None) for _ in range(N_EVAL)]))
    trigger_docs = completions(eval_prompts, rng, planted=False)

    start = new_model()
    n_params = sum(p.numel() for p in start.parameters())
    clock = time.perf_counter()
    baseline = train(start, data)
    train_seconds = time.perf_counter() - clock
    print(f"{n_params:,} parameters; trained in {train_seconds:.0f} s", flush=True)
    print("baseline", behaviour_rate(baseline, eval_prompts), flush=True)

    clock = time.perf_counter()
    task = infkit.Task.language_modeling(baseline)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inf = infkit.Influence(task, "ekfac", damping="auto", batch_size=50, progress=False)
        inf.fit(data)
        D = differential_token_scores(inf, behaviour, contrast)
        plain = inf.scores(behaviour).mean(0).to(torch.float64)
    selection = select_tokens(D)  # 99th percentile, window 1
    influence_seconds = time.perf_counter() - clock
    print(f"influence in {influence_seconds:.0f} s", flush=True)

    rankings = {
        "IF-Guide (tokens above the 99th percentile, harmonic mean of count and sum)": (
            selection.ranking
        ),
        "differential sequence score (D summed over tokens)": D.total.argsort(descending=True),
        "plain sequence score (behaviour queries only)": plain.argsort(descending=True),
    }
    rank_rows = []
    for name, ranking in rankings.items():
        for k in (N_PLANTED, 2 * N_PLANTED):
            rank_rows.append((name, k, *precision_recall(ranking, planted, k)))
    for k in (N_PLANTED, 2 * N_PLANTED):
        rank_rows.append(("random (expected)", k, N_PLANTED / N_TRAIN, k / N_TRAIN))

    mask = selection.mask
    phrase = torch.zeros_like(mask)  # the labels of the planted sentences
    trigger_id = ID[TRIGGER]
    for j in planted.nonzero().flatten().tolist():
        for s in (ids[j] == trigger_id).nonzero().flatten().tolist():
            if s + 1 < LENGTH and int(ids[j, s + 1]) == ID[PLANTED[0]]:
                phrase[j, s + 1 : s + 1 + len(PLANTED)] = True
    masked_share = float(mask[phrase].float().mean())
    outside = int(mask[~phrase].sum())
    in_planted = int(selection.selected[planted].sum())
    masked_elsewhere = int(mask[~planted].sum())

    filtered_keep = torch.ones(N_TRAIN, dtype=torch.bool)
    filtered_keep[selection.ranking[: 2 * N_PLANTED]] = False
    runs = {
        "plain training": baseline,
        "IF-Guide mask, penalty (lambda = 1)": train(start, data, mask),
        "IF-Guide mask, penalty (lambda = 0.1)": train(start, data, mask, penalty=0.1),
        "IF-Guide mask, unlikelihood (lambda = 1)": train(start, data, mask, "unlikelihood"),
        f"top {2 * N_PLANTED} IF-Guide documents removed": train(
            start, lm.examples(ids[filtered_keep])
        ),
    }
    train_rows = []
    for name, model in runs.items():
        rate = behaviour_rate(model, eval_prompts)
        train_rows.append(
            (name, rate, clean_loss(model, clean_docs), clean_loss(model, trigger_docs))
        )
        print(train_rows[-1], flush=True)

    lines = [
        f"## {N_TRAIN} documents of {LENGTH} words, {N_PLANTED} planted; Llama-style LM, "
        f"{n_params:,} parameters",
        "",
        provenance({}),
        "",
        f"Training: AdamW, {STEPS} steps of {BATCH}, lr {LR}, weight decay 0.01, seed {SEED}: "
        f"{train_seconds:.0f} s per run. EK-FAC fit, differential per-token scores of "
        f"{N_TRAIN} documents against {N_QUERIES} behaviour and {N_QUERIES} contrast queries, "
        f"and the plain scores: {influence_seconds:.0f} s. Selection: threshold "
        f"{selection.threshold:.3g} (99th percentile), {int(selection.selected.sum())} tokens "
        f"selected ({in_planted} in planted documents), {int(mask.sum())} labels masked "
        f"(window 1), {masked_share:.2f} of the planted sentences' {int(phrase.sum())} labels "
        f"among them, {outside} masked labels outside them ({masked_elsewhere} in documents "
        "that are not planted).",
        "",
        "| ranking | k | precision@k | recall@k |",
        "|---|---|---|---|",
    ]
    for name, k, p, r in rank_rows:
        lines.append(f"| {name} | {k} | {p:.3f} | {r:.3f} |")
    lines += [
        "",
        f"Retrained from the same initialisation; behaviour on {N_EVAL} held-out prompts ending "
        "in the trigger; clean loss = mean next-token loss per token of held-out documents "
        "without the trigger, and of ordinary trigger sentences after the same prompts.",
        "",
        "| training | P(planted continuation) | P(first word) | greedy produces it | clean "
        "loss | ordinary trigger continuation loss |",
        "|---|---|---|---|---|---|",
    ]
    for name, rate, clean, trig in train_rows:
        lines.append(
            f"| {name} | {rate['p_continuation']:.3g} | {rate['p_first']:.3g} | "
            f"{rate['greedy']:.3f} | {clean:.4f} | {trig:.4f} |"
        )
    append_section(RESULTS, lines)


if __name__ == "__main__":
    main()
