"""The tables and printed lines of ``retrieval_quality.py``: the decision table and its summary, the
max-distance table, and each set's lines."""

from __future__ import annotations


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def max_distance_markdown(found: dict) -> str:
    """The ``max_distance_check`` figures as a table: mAP (points) and the paired difference."""
    sets = list(next(iter(found.values())))
    distances = list(found[next(iter(found))][sets[0]])
    head = ["setting"] + [f"{n} max_distance {d}" for n in sets for d in distances]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, by_set in found.items():
        lines.append("| " + " | ".join([label] + [
            f"{pct(by_set[n][d]['map'])} ({100 * by_set[n][d]['diff'][0]:+.1f} +- {100 * by_set[n][d]['diff'][1]:.1f})"
            for n in sets for d in distances]) + " |")
    return "\n".join(lines)


def markdown(rows: list[dict], set_names: list[str], chosen: dict | None, max_loss: float) -> str:
    """The decision table, best mean mAP first (mAP and differences in points, i.e. x 100)."""
    head = ["rank_by", "vote w", "nbr K", "nbr min", "exp K", "exp T"]
    for n in set_names:
        head += [f"{n} mAP", f"{n} mP@10"]
        if n == "hard":
            head += ["hard scene-mean", "hard-medium mAP", "hard-medium scene-mean"]
    head += ["mean mAP"] + [f"{n} diff (SE)" for n in set_names] + ["admissible"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in sorted(rows, key=lambda r: -r["mean_map"]):
        s = row["setting"]
        mark = " (default)" if row["default"] else (" (chosen)" if row is chosen else "")
        cells = [s["rank_by"] + mark, f"{s['vote_weight']:g}" if s["rank_by"] == "combined" else "",
                 str(s["table_k"] if s["expand"] else 0), str(s["table_min"]) if s["expand"] else "",
                 str(s["expand"]) if s["expand"] else "0", str(s["expand_min"]) if s["expand"] else ""]
        for n in set_names:
            f = row["sets"][n]
            cells += [pct(f["map"]), pct(f["mp@10"])]
            if n == "hard":
                m = f["protocols"]["medium"]
                cells += [pct(f["scene_mean"]), pct(m["map"]), pct(m["scene_mean"])]
        cells += [pct(row["mean_map"])]
        cells += [f"{100 * row['sets'][n]['diff'][0]:+.1f} ({100 * row['sets'][n]['diff'][1]:.1f})" for n in set_names]
        cells += ["yes" if row["admissible"] else "no"]
        if row is chosen or row["default"]:
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(prepared: dict, names: list, protocols: dict, grid: list, started: str, load: float,
            max_loss: float, default, base: dict, chosen: dict, rows: list, timing: dict) -> str:
    """The decision's summary above its table: the sets, the rule, the default and the chosen
    setting with their paired differences, and the seconds per query."""
    described = ", ".join(f"{n} ({len(prepared[n]['queries'])} queries, {prepared[n]['images']} images, "
                          f"{protocols[n]} protocol)" for n in names)
    lines = [f"Sets: {described}; preset {prepared[names[0]]['preset']}; {len(grid)} settings.",
             f"Started {started}; load average at start {load:.2f}.",
             f"Decision rule: best mean mAP over the sets among the settings losing at most {100 * max_loss:g} "
             f"mAP point(s) against today's default ({default.label()}) on every set. mAP, mP@10 and differences "
             "in points (x 100); diff = mean per-query AP difference from the default (standard error).", "",
             f"**Default**: {base['label']}: " + ", ".join(f"{n} {pct(base['sets'][n]['map'])}" for n in names)
             + f"; mean {pct(base['mean_map'])}.",
             f"**Chosen**: {chosen['label']}: " + ", ".join(
                 f"{n} {pct(chosen['sets'][n]['map'])} ({100 * chosen['sets'][n]['diff'][0]:+.1f} +- "
                 f"{100 * chosen['sets'][n]['diff'][1]:.1f})" for n in names) + f"; mean {pct(chosen['mean_map'])}.",
             f"Admissible settings: {sum(r['admissible'] for r in rows)} of {len(rows)}.", "",
             "Seconds per query (search = shortlist + ANN + voting + RANSAC of 100; re-rank + expansion offline):", ""]
    for n in names:
        t = timing[n]
        lines.append(f"- {n}: search {t['search_total']:.3f} s (" + ", ".join(
            f"{k} {v:.3f}" for k, v in t["search_seconds_per_query"].items())
            + f"); re-rank {t['rerank_expand_seconds_default'] * 1000:.1f} ms (default), re-rank + expansion "
            f"{t['rerank_expand_seconds_chosen'] * 1000:.1f} ms (chosen); neighbour table build "
            f"{t['neighbour_seconds_per_database_image']:.3f} s per database image")
    return "\n".join(lines)


def print_set(data: dict, classic: dict, protocol: str) -> None:
    t = data["seconds_per_query"]
    print(f"{data['set']}: {data['preset']}: {data['images']} images, {len(data['queries'])} queries, {data['index']}, "
          f"{data['descriptors']} descriptors; search per query " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in t.items())
          + f" (total {sum(t.values()) * 1000:.0f} ms); neighbour search {data['neighbour_seconds_per_image']:.3f} s "
          f"per database image ({len(data['edges'])} verified pairs at >= 1 inlier); extraction "
          f"{data['extract_seconds_per_image']:.2f} s per image", flush=True)
    print(f"  {data['set']}: true matches surviving the image shortlist: "
          + ", ".join(f"top {n}: {v:.3f}" for n, v in data["shortlist_survival"].items()))
    print(f"  {'rule (no expansion), ' + protocol + ' protocol':<44} {'mAP':>6} {'mP@1':>6} {'mP@5':>6} "
          f"{'mP@10':>6} {'GLD':>6} {'GLD+dq':>6}")
    for name, s in classic.items():
        dq = s.get("gld_with_distractor_queries")
        print(f"  {name:<44} {s['map']:6.3f} {s['mp@1']:6.3f} {s['mp@5']:6.3f} {s['mp@10']:6.3f} "
              f"{s['gld_micro_ap']:6.3f} {'' if dq is None else f'{dq:6.3f}':>6}", flush=True)


def print_sift(set_name: str, sift: dict) -> None:
    s, t = sift["scores"], sift["seconds_per_query"]
    print(f"{set_name + ': SIFT baseline':<52} {s['map']:6.3f} {s['mp@1']:6.3f} {s['mp@5']:6.3f} {s['mp@10']:6.3f} "
          f"{s['gld_micro_ap']:6.3f}  {t['match+ransac']:.3f}; {t['extract']:.2f}", flush=True)
