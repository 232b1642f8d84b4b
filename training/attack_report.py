"""`fedrec attack-report`: the purchased-items leakage attack under each protection.

One round from the initial model: every merchant runs `local_update` without and with
customer-level DP (the mechanism planned for `epsilon` over `dp_rounds` rounds). The
honest-but-curious coordinator ranks item rows by norm (`fedrec.privacy.attacks`) in:
- `none`: the target merchant's own update (what it sees without secure aggregation);
- `secagg_sum`: the sum over all merchants' terms (all SecAgg+ lets it decode);
- with `--groups G`, `secagg_groups<G>`: the sum over the target's group of round 1, G random
  groups of the merchants (`federation.robust_groups`: one secure sum per group);
- `dp`: the target merchant's DP update;
- `dp_secagg`: the sum of the DP updates;
- with `--split-set` (`privacy.noise_split` = n): `dp_split`, one merchant's message carrying only
  its 1/sqrt(n) share of the noise (what a coordinator isolates when every other merchant
  colludes with it, or without SecAgg+), and `dp_split_secagg`, their sum (what SecAgg+ shows).
Each merchant is the target once; the report gives the mean and the per-merchant figures.

Membership of a customer: half of each merchant's customers (drawn at random) train the model,
the other half never do. The attacker holds the shared export (item vectors) and a customer's
purchase history; it folds a user vector in from that history (the serving fold-in) and scores
the history's mean log-likelihood under it: a model that trained on those purchases explains them
better. AUC of that score, members against non-members, without and with DP (and with the
noise split across merchants, where `--split-set` asks for it).

Poisoning (item promotion, `fedrec.privacy.poisoning`): a fake merchant with made-up customers
who all bought one unpopular target product (and a few popular ones) crafts the target's id row
(20x the longest other row, a new random direction each round) and boosts its message 100x. For
each aggregation rule (FedAvg, the sum form secure aggregation allows, and the robust rules of
`fedrec.federated.robust`, which need to see every merchant's delta), the target's exposure (share
of real test customers with it in their top-20) with and without the attacker, and the honest
merchants' test recall@20; a new target and seed each time, mean over seeds. The clipping rules
(norm_clip, row_clip, row_clip_foolsgold) run once per bound (`--clip-multiples`, in multiples of
the round's medians), and each clean run records its validation recall@20 too, so that a bound
can be chosen without reading test labels (exposure reads none: it counts the target in customers'
top-20 lists). `--rules` reruns some rules and keeps the others' rows. Attacks adapted to a bound on
each row: `--direction fixed|popular` (where the crafted row points) and `--through tokens` (the
target's content-token rows crafted too, so the push spreads over rows a row bound caps one by one).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import scipy.special
import torch
from rich.console import Console

from fedrec.atomic import write_json
from fedrec.config import RunConfig, aggregation_rule, with_overrides
from fedrec.data import FederatedDataset, MerchantData, pooled
from fedrec.errors import FedrecError
from fedrec.evaluation import evaluate_test_all
from fedrec.features import build_item_features
from fedrec.federated.aggregation import DELTA, merchant_sums
from fedrec.federated.groups import MIN_GROUPS, assign_groups, check_groups
from fedrec.federated.local import local_update
from fedrec.federated.robust import CLIPPING_RULES
from fedrec.federated.simulation import FederationConfig, run_federated
from fedrec.model import ID_TABLE as TABLE
from fedrec.model import init_item_bias, init_user_embeddings, initial_item_state, item_embeddings
from fedrec.privacy.accountant import plan_mechanism
from fedrec.privacy.attacks import auc, leakage_metrics, row_scores
from fedrec.privacy.poisoning import DIRECTIONS, colluding, exposure, fake_merchant, promote
from fedrec.serving.foldin import fold_in_many
from fedrec.threads import use_threads
from fedrec.training.data import load_dataset


def leakage_report(
    cfg: RunConfig,
    epsilon: float,
    dp_rounds: int,
    console: Console,
    split: RunConfig | None = None,
    groups: int = 0,
) -> dict:
    """The leakage attack on round 1's messages; with `split` (the split-noise run's config, its
    budget already `epsilon` and its `federation.rounds` the schedule), also on the split-noise
    messages and their sum; with `groups`, also on the sum over the target's group of round 1
    (`federation.robust_groups`: what one secure sum per group shows)."""
    use_threads(cfg.threads)
    seed = cfg.federation.seed
    dataset = load_dataset(cfg.data, seed)
    if not cfg.model.use_item_id:
        raise FedrecError("the leakage attack reads the item-id table: model.use_item_id must be on")
    if groups:  # before any update is computed
        check_groups(len(dataset.merchants), groups)
    features = build_item_features(dataset.items, cfg.model.hash_buckets)
    mech = plan_mechanism(dataclasses.replace(cfg.privacy, epsilon=epsilon), dp_rounds, cfg.local.epochs)
    # (setting, run config, mechanism): each message the coordinator could receive in round 1
    runs = [("none", cfg, None), ("dp", cfg, mech)]
    if split is not None:
        split_mech = plan_mechanism(split.privacy, split.federation.rounds, split.local.epochs)  # one step a round
        runs.append(("dp_split", split, split_mech))
    fed = cfg.federation
    own: dict[str, dict[str, np.ndarray]] = {name: {} for name, _, _ in runs}
    sums: dict[str, np.ndarray | None] = {name: None for name, _, _ in runs}
    start = {name: initial_item_state(dataset.n_items, run.model, seed) for name, run, _ in runs}  # round 1's tower
    for i, m in enumerate(dataset.merchants):
        for setting, run, dp in runs:
            state = start[setting]
            users = init_user_embeddings(m.n_users, run.model, torch.Generator().manual_seed(seed * 7919 + i))
            bias = init_item_bias(dataset.n_items, run.model)
            res = local_update(state, users, m.train, features, run.model, run.local, seed * 1009 + i, bias, dp)
            # fedavg: the delta every rule sends (rowwise adds per-row weights that name the sold
            # rows outright; it is never used under DP, so the comparison is on this delta)
            terms = merchant_sums(
                res.delta, res.num_examples, res.num_steps, res.touched_rows, res.mean_loss,
                "fedavg", fed.normalize_steps,
            )  # fmt: skip
            table = terms[DELTA + TABLE].numpy()
            own[setting][m.name] = table
            sums[setting] = table.copy() if sums[setting] is None else sums[setting] + table
        console.print(f"  {m.name}: updates computed ({', '.join(own)})")
    seen = {"none": "none", "secagg_sum": "none", "dp": "dp", "dp_secagg": "dp"}  # report row -> setting
    if split is not None:
        seen |= {"dp_split": "dp_split", "dp_split_secagg": "dp_split"}
    group_sum: dict[str, np.ndarray] = {}  # merchant -> the sum over its group (unprotected updates)
    if groups:
        names = [m.name for m in dataset.merchants]
        for idx in assign_groups(len(names), groups, seed, 1):
            total = sum(own["none"][names[i]] for i in idx)
            group_sum |= {names[i]: total for i in idx}
        seen[f"secagg_groups{groups}"] = "none"
    per: dict[str, dict[str, dict]] = {k: {} for k in seen}
    for m in dataset.merchants:
        sold = np.asarray(m.train.sum(axis=0)).ravel() > 0
        for row, setting in seen.items():
            if row.startswith("secagg_groups"):
                table = group_sum[m.name]
            elif row == "secagg_sum" or row.endswith("_secagg"):
                table = sums[setting]
            else:
                table = own[setting][m.name]
            per[row][m.name] = leakage_metrics(row_scores(table), sold)
    out = {}
    for setting, rows in per.items():
        out[setting] = {
            key: float(np.mean([r[key] for r in rows.values()])) for key in ("precision", "recall", "auc")
        } | {"per_merchant": rows}
    for row in ("dp", "dp_secagg"):
        out[row] |= {"epsilon": epsilon, "noise_multiplier": mech.noise_multiplier}
    if split is not None:
        for row in ("dp_split", "dp_split_secagg"):
            out[row] |= {
                "epsilon": epsilon,
                "noise_multiplier": split_mech.noise_multiplier,
                "noise_split": split_mech.noise_split,
                "rounds": split.federation.rounds,
            }
    return {"dataset": dataset.name, "merchants": len(dataset.merchants), "items": dataset.n_items, "leakage": out}


def _members_only(dataset: FederatedDataset, seed: int) -> tuple[FederatedDataset, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    masks, merchants = {}, []
    for m in dataset.merchants:
        member = rng.random(m.n_users) < 0.5
        masks[m.name] = member
        idx = np.flatnonzero(member)
        merchants.append(MerchantData(m.name, m.user_ids[idx], m.train[idx], m.val[idx], m.test[idx]))
    return dataclasses.replace(dataset, merchants=merchants), masks


def membership_scores(item_vectors: np.ndarray, history: sp.csr_matrix, temperature: float) -> np.ndarray:
    """Per customer: mean log softmax of their purchases under the user vector folded in from them."""
    baskets = [history.indices[history.indptr[i] : history.indptr[i + 1]] for i in range(history.shape[0])]
    users = fold_in_many(item_vectors, baskets, method="softmax", reg=1.0, temperature=temperature)
    logits = users @ item_vectors.T / temperature
    logp = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
    rows = np.repeat(np.arange(history.shape[0]), np.diff(history.indptr))
    return np.bincount(rows, weights=logp[rows, history.indices], minlength=history.shape[0]) / np.maximum(
        np.diff(history.indptr), 1
    )


def membership_report(
    cfg: RunConfig, epsilon: float, dp_rounds: int, console: Console, split: RunConfig | None = None
) -> dict:
    """Train on half the customers without and with DP (and with `split`, the split-noise run's
    config, its budget already `epsilon`); the attacker's AUC on members against the rest."""
    use_threads(cfg.threads)
    seed = cfg.federation.seed
    dataset = load_dataset(cfg.data, seed)
    features = build_item_features(dataset.items, cfg.model.hash_buckets)
    members, masks = _members_only(dataset, seed)
    eligible = [m for m in dataset.merchants if m.n_users]
    labels = np.concatenate([masks[m.name] for m in eligible])
    dp_run = with_overrides(cfg, {"privacy.epsilon": epsilon, "federation.rounds": dp_rounds})
    runs = [("none", cfg), ("dp", dp_run)]
    if split is not None:
        runs.append(("dp_split", split))
    out = {}
    for setting, run in runs:
        rounds = run.federation.rounds
        mech = plan_mechanism(run.privacy, rounds, run.local.epochs)  # split noise: one step a round
        res = run_federated(members, features, run.model, run.local, run.federation, dp=mech)
        vecs = item_embeddings(res.item_state, features, run.model).numpy()
        temperature = res.temperature or run.local.temperature  # the chosen one, where local.temperature = 0
        scores = np.concatenate([membership_scores(vecs, m.train, temperature) for m in eligible])
        out[setting] = {"auc": auc(scores, labels), "members": int(labels.sum()), "non_members": int((~labels).sum())}
        if mech is not None:
            out[setting] |= {"epsilon": epsilon, "noise_multiplier": mech.noise_multiplier, "rounds": rounds}
        if mech is not None and mech.noise_split:
            out[setting]["noise_split"] = mech.noise_split
        console.print(f"  membership, {setting}: AUC {out[setting]['auc']:.3f}")
    return out


@dataclasses.dataclass(frozen=True)
class PoisonConfig:
    rounds: int = 20
    seeds: tuple[int, ...] = (0, 1, 2)
    fake_share: float = 0.05  # fake customers, as a share of the real ones
    filler: int = 4  # popular products each fake customer "bought" beside the target
    popular: int = 50  # the filler is drawn from this many most-bought products
    boost: float = 100.0
    strength: float = 20.0  # the crafted target row's length, in units of the longest other row
    rules: tuple[str, ...] = ("none", "norm_clip", "row_clip", "row_clip_foolsgold", "trimmed_mean", "median")
    # the clipping rules (norm_clip, row_clip, row_clip_foolsgold) run once per multiple of the
    # round's medians (`federation.clip_multiple`); a row other than 1 is named <rule>_x<multiple>
    clip_multiples: tuple[float, ...] = (1.0,)
    # rows of the configured sum-form rule with `federation.sum_clip` at each of these (the bound on
    # the round's aggregate that secure aggregation allows); a row is named <rule>_sum_clip_x<m>
    sum_clips: tuple[float, ...] = ()
    # >= 3: the robust rules read the sums of this many random groups of each round's merchants
    # (`federation.robust_groups`, what one secure sum per group shows); a row is named <rule>_groups<G>
    robust_groups: int = 0
    # Colluding fake merchants, each with its own `fake_share` of made-up customers; they push the
    # same target along the same direction each round (one shared random stream).
    attackers: int = 1
    # > 0: each attacker hides its update's likeness to the others' under noise of its own, this
    # many times each row's norm (`promote`'s camouflage; against row_clip_foolsgold)
    camouflage: float = 0.0
    # where the crafted target row points each round (`promote`'s direction): "fresh" (a new random
    # one), or, adapted to a row bound, "fixed" (one kept) or "popular" (the popular products' mean)
    direction: str = "fresh"
    # which of the target's rows the attacker crafts: "id" (its id row) or "tokens" (its id row and
    # its content-token rows, `promote`'s tokens: a push a bound on each row bounds row by row)
    through: str = "id"


THROUGH = ("id", "tokens")  # PoisonConfig.through's choices


def check_poisoning(cfg: RunConfig, pc: PoisonConfig) -> None:
    """Refuse an attack that is not one, or that the configured model cannot carry (before anything trains)."""
    if pc.direction not in DIRECTIONS:
        raise FedrecError(f"--direction {pc.direction!r}: choose one of {', '.join(DIRECTIONS)}")
    if pc.through not in THROUGH:
        raise FedrecError(f"--through {pc.through!r}: choose one of {', '.join(THROUGH)}")
    if pc.robust_groups and (pc.robust_groups < MIN_GROUPS or set(pc.rules) <= {"none"}):
        raise FedrecError(f"--groups {pc.robust_groups}: groups the merchants for a robust rule; it needs one in "
                          f"--rules and at least {MIN_GROUPS} groups (0: off)")  # fmt: skip
    if pc.through == "tokens" and not cfg.model.use_content:
        raise FedrecError("--through tokens: this model has no content tower, so no token rows to push "
                          "(model.use_content = false)")  # fmt: skip


def pick_target(counts: np.ndarray, seed: int) -> int:
    """An unpopular product: drawn among those bought at least once but at most the median count."""
    bought = np.flatnonzero(counts > 0)
    tail = bought[counts[bought] <= np.median(counts[bought])]
    return int(np.random.default_rng(seed).choice(tail))


def poisoning_report(
    cfg: RunConfig, console: Console, pc: PoisonConfig = PoisonConfig(), clean_runs: dict | None = None
) -> dict:
    """Target exposure and honest recall@20 with and without the attacker, per aggregation rule.

    `clean_runs` keeps the runs without an attacker, keyed by their settings: a second report on
    the same data (more colluders) reuses them instead of training the same model again.
    """
    check_poisoning(cfg, pc)
    clean_runs = {} if clean_runs is None else clean_runs
    use_threads(cfg.threads)
    dataset = load_dataset(cfg.data, cfg.federation.seed)
    features = build_item_features(dataset.items, cfg.model.hash_buckets)
    honest = dataset.merchants
    counts = np.asarray(pooled(dataset).full_train.sum(axis=0)).ravel()
    popular = np.argsort(-counts, kind="stable")[: pc.popular]
    n_fake = max(1, round(pc.fake_share * sum(m.n_users for m in honest)))
    out: dict = {"attackers": pc.attackers, "fake_customers": n_fake, "boost": pc.boost, "strength": pc.strength,
                 "filler": pc.filler, "rounds": pc.rounds, "seeds": list(pc.seeds), "rules": {}}  # fmt: skip
    if pc.camouflage:  # only then, so that the sections of runs without it still compare (ATTACK_KEYS)
        out["camouflage"] = pc.camouflage
    if pc.direction != "fresh":  # likewise
        out["direction"] = pc.direction
    if pc.through != "id":
        out["through"] = pc.through
    for rule, multiple, sum_clip in _rule_rows(pc):
        runs = []
        for seed in pc.seeds:
            target = pick_target(counts, seed)
            fed = dataclasses.replace(
                cfg.federation,
                robust=rule,
                rounds=pc.rounds,
                seed=seed,
                clip_multiple=multiple,
                sum_clip=sum_clip,
                robust_groups=0 if rule == "none" else pc.robust_groups,
            )
            names = ["mallory", *(f"mallory{j}" for j in range(1, pc.attackers))]
            fakes = [
                fake_merchant(dataset.n_items, target, popular, n_fake, pc.filler, 1000 * j + seed, name)
                for j, name in enumerate(names)
            ]
            row = {"target": target, "target_purchases": int(counts[target])}
            poisoned = dataclasses.replace(dataset, merchants=[*honest, *fakes])
            tokens = features.tokens[target]
            tokens = tokens[tokens != features.n_buckets] if pc.through == "tokens" else None
            hooks = [promote(f.name, target, popular, pc.boost, fed.normalize_steps, pc.strength, seed,
                             pc.camouflage, direction=pc.direction, tokens=tokens) for f in fakes]  # fmt: skip
            attack = colluding(hooks)
            key = (repr(cfg), repr(fed), target)  # a clean run depends on the settings and the target only
            for label, ds, tamper in (("clean", dataset, None), ("attacked", poisoned, attack)):
                if label == "clean" and key in clean_runs:
                    row |= clean_runs[key]
                    continue
                res = run_federated(ds, features, cfg.model, cfg.local, fed, tamper=tamper)
                vecs = item_embeddings(res.item_state, features, cfg.model)
                got = {f"{label}_exposure": exposure(honest, res.user_embeddings, vecs, res.item_biases, target)}
                test = evaluate_test_all(honest, res.user_embeddings, vecs, res.item_biases)
                got[f"{label}_recall@20"] = test["overall"]["recall@20"]
                if label == "clean":  # what a setting may be chosen by: the early-stopped round's validation
                    got["clean_val_recall@20"] = {h.round: h.val_recall_at_20 for h in res.history}.get(res.best_round)
                    clean_runs[key] = got
                row |= got
            runs.append(row)
            console.print(f"  poisoning, {rule} (multiple {multiple:g}, sum clip {sum_clip:g}), seed {seed}: {row}")
        # no robust rule: the configured aggregation as run (auto resolves to rowwise on a shop
        # with one id row per product), the rule that works under secure aggregation
        name = aggregation_rule(cfg, dataset.n_items) if rule == "none" else rule
        if rule in CLIPPING_RULES and multiple != 1:
            name = f"{rule}_x{multiple:g}"
        if sum_clip:
            name = f"{name}_sum_clip_x{sum_clip:g}"
        if fed.robust_groups:
            name = f"{name}_groups{fed.robust_groups}"
        if rule == "trimmed_mean" and fed.trim != DEFAULT_TRIM:  # a rerun at another trim adds a row
            name = f"trimmed_mean_t{fed.trim:g}"
        mean = {
            k: None if any(r[k] is None for r in runs) else float(np.mean([r[k] for r in runs]))
            for k in runs[0]
            if k.endswith(("exposure", "recall@20"))
        }  # the validation recall is None where a run had no validation slice
        out["rules"][name] = {
            "target_exposure": mean["attacked_exposure"],
            "clean_exposure": mean["clean_exposure"],
            "recall@20": mean["attacked_recall@20"],
            "clean_recall@20": mean["clean_recall@20"],
            "clean_val_recall@20": mean["clean_val_recall@20"],
            "secure_aggregation_compatible": rule == "none" or fed.robust_groups > 0,
            **({"robust_groups": fed.robust_groups} if fed.robust_groups else {}),
            **({"clip_multiple": multiple} if rule in CLIPPING_RULES else {}),
            **({"trim": fed.trim} if rule == "trimmed_mean" else {}),
            **({"sum_clip": sum_clip} if sum_clip else {}),
            "runs": runs,
        }
    return out


def _rule_rows(pc: PoisonConfig) -> list[tuple[str, float, float]]:
    """(rule, clip multiple, sum clip) for each row of the report: each clipping rule once per
    multiple, and the sum-form rule once more per sum clip."""
    rows = [(rule, m, 0.0) for rule in pc.rules for m in (pc.clip_multiples if rule in CLIPPING_RULES else (1.0,))]
    return rows + [("none", 1.0, c) for c in pc.sum_clips]


SECTIONS = ("leakage", "membership", "poisoning", "poisoning_colluding")
DEFAULT_TRIM = FederationConfig().trim  # rows at another trim are named for it


def write_attack_report(res: dict, results_dir: Path, command: str) -> Path:
    """results/attack-report.json: the sections this run made replace those of an earlier run (a
    run of some parts keeps the others); `commands` names the run behind each section."""
    path = results_dir / "attack-report.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    if old.get("dataset", res.get("dataset")) != res.get("dataset"):
        old = {}  # another dataset's report: nothing of it is kept
    earlier = old.get("commands") or {k: old["command"] for k in SECTIONS if k in old}
    commands = earlier | {k: command for k in SECTIONS if k in res}
    res = dict(res)
    for k in ("poisoning", "poisoning_colluding"):
        if k not in res:
            continue
        rows = {rule: {**r, "command": command} for rule, r in res[k]["rules"].items()}
        if _same_attack(old.get(k), res[k]):  # a run of some rules keeps the other rules' rows
            rows = {rule: {"command": earlier.get(k, ""), **r} for rule, r in old[k]["rules"].items()} | rows
        res[k] = {**res[k], "rules": rows}
    created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    write_json(path, {**old, **res, "created": created, "command": command, "commands": commands})
    return path


def _same_attack(old: dict | None, new: dict) -> bool:
    """Whether two poisoning sections ran the same attack (then their rows compare, rule by rule)."""
    return old is not None and all(old.get(k) == new.get(k) for k in ATTACK_KEYS)


ATTACK_KEYS = ("attackers", "fake_customers", "boost", "strength", "filler", "rounds", "seeds", "camouflage",
               "direction", "through")  # fmt: skip
