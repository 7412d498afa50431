"""How an audit report reads: the printed summary table and the self-contained audit.html.

The HTML embeds its plots as base64 PNG data URIs, so the one file can be mailed or archived
alone. Flags are red in the HTML and marked ``!!`` with their count in the printed table.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from common.dataset_summary import markdown_table
from server.audit.person_epsilon import MAX_EXACT

FLAG_MARK = "!!"


def _number(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4f}"
    return str(value)


def _distinct(rounds: list[dict[str, Any]], key: str) -> str:
    """One value if every round used it, else each distinct value (σ may change on restart)."""
    values = list(dict.fromkeys(r[key] for r in rounds))
    return ", ".join(_number(v) for v in values) if values else "-"


PLATFORM_HEADER = [
    "platform",
    "δ",
    "σ",
    "C",
    "q",
    "steps/round",
    "rounds",
    "released statistics",
    "ε PRV",
    "ε RDP",
    "ε PLD (recomp.)",
    "ε RDP (recomp.)",
    "budget",
    "left",
    "chain",
    "flags",
]


def platform_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for p in report["platforms"]:
        marker = f"{FLAG_MARK} {p['flags']}" if p["flags"] else "0"
        if p.get("dp") is False:
            rows.append([p["platform"], *["DP off"] + ["-"] * 13, marker])
            continue
        rounds = [r for r in p["rounds"] if r.get("mechanism", "dp-sgd") == "dp-sgd"]
        releases = [
            f"{r['mechanism']} σ = {_number(r['noise_multiplier'])} "
            f"(ε alone {_number(r['epsilon_round_pld'])})"
            for r in p["rounds"]
            if r.get("mechanism", "dp-sgd") != "dp-sgd"
        ]
        rows.append(
            [
                p["platform"],
                _number(p["delta"]),
                _distinct(rounds, "noise_multiplier"),
                _distinct(rounds, "max_grad_norm"),
                _distinct(rounds, "sample_rate"),
                _distinct(rounds, "steps"),
                str(len(rounds)),
                "; ".join(releases) or "-",
                _number(p["epsilon_spent_prv"]),
                _number(p["epsilon_spent_rdp"]),
                _number(p["epsilon_spent_pld_recomputed"]),
                _number(p["epsilon_spent_rdp_recomputed"]),
                _number(p["epsilon_budget"]),
                _number(p["budget_left"]),
                "ok" if p["hash_chain_intact"] else f"{FLAG_MARK} broken",
                marker,
            ]
        )
    return rows


PERSON_HEADER = [
    "k",
    "worst-case platforms",
    "ε PRV (FedFuse)",
    "ε PLD (dp_accounting)",
    "ε bounds",
]


def person_heading(report: dict[str, Any]) -> str:
    """How to read the person-level table: who, which subsets, at which δ, by what."""
    person = report["person_epsilon"]
    n = person["platforms"]
    scope = (
        f"the worst case over every set of k of the {n} platforms"
        if person["every_subset"]
        else f"k = 1 and k = {n} only (more than {MAX_EXACT} platforms: the worst set of k "
        "platforms for 1 < k < n lies between those two figures)"
    )
    return (
        f"A person's ε across the federation, for a person present on k platforms: {scope}, "
        f"at δ = {_number(person['delta'])}, composing every ledger entry of those platforms "
        "(DP-SGD rounds and released statistics); worst case found with dp_accounting PLD, "
        "ε computed with FedFuse's PRV accountant and PLD"
    )


def person_rows(report: dict[str, Any]) -> list[list[str]]:
    return [
        [
            str(row["k"]),
            ", ".join(row["platforms"]),
            _number(row["epsilon_prv"]),
            _number(row["epsilon_pld"]),
            row["bounds"],
        ]
        for row in report["person_epsilon"]["rows"]
    ]


BYTES_HEADER = [
    "round",
    "train sent B",
    "train received B",
    "evaluate sent B",
    "largest upload B",
    "upload / full model",
]


def bytes_rows(report: dict[str, Any]) -> list[list[str]]:
    return [
        [
            str(r["round"]),
            f"{r['train_sent']:,}",
            f"{r['train_received']:,}",
            f"{r['evaluate_sent']:,}",
            f"{r['largest_upload']:,}",
            f"{100 * r['upload_share_of_full_model']:.3f} %",
        ]
        for r in report["wire"]["bytes_per_round"]
    ]


CANARY_HEADER = ["platform", "canaries", "guesses", "correct", "ε lower bound", "ε theory", "ok"]


def canary_rows(report: dict[str, Any]) -> list[list[str]]:
    canary = report["canary"] or {"platforms": []}
    return [
        [
            row["platform"],
            str(row["canaries"]),
            str(row["guesses"]),
            str(row["correct"]),
            _number(row["epsilon_lower_bound"]),
            _number(row["epsilon_theoretical"]),
            "ok" if row["epsilon_lower_bound"] <= row["epsilon_theoretical"] else FLAG_MARK,
        ]
        for row in canary["platforms"]
    ]


WHITE_BOX_HEADER = [
    "platform",
    "unit",
    "σ",
    "C",
    "δ",
    "ε ledger (all rounds)",
    "trials",
    "false pos.",
    "false neg.",
    "μ ≥",
    "μ theory (1/σ)",
    "ε one step ≥",
    "ε one step (theory)",
    "ok",
]


def white_box_heading(report: dict[str, Any]) -> str:
    """What the white-box bound is about, and why it is not compared with the ledger's ε."""
    section = report["white_box"]
    return (
        f"White-box audit of the DP step (confidence {section['confidence']}): "
        f"{section['trials']:,} Dirac canary gradients of norm {section['canary_norm']:g} C "
        "through FedFuse's DP-SGD step at each platform's recorded σ, C and privacy unit (under "
        "'user' a canary is one more user's row, after each user's units are summed). One noisy "
        "step with the canary inserted directly is the Gaussian mechanism (sensitivity C, noise "
        "σC, no subsampling): its bound is compared with that step's ε, not with the ledger's "
        "ε over all rounds (shown for reference)"
    )


def white_box_rows(report: dict[str, Any]) -> list[list[str]]:
    return [
        [
            row["platform"],
            row["privacy_unit"],
            _number(row["noise_multiplier"]),
            _number(row["max_grad_norm"]),
            _number(row["delta"]),
            _number(row["epsilon_ledger"]),
            f"{row['trials']:,}",
            f"{row['false_positives']:,}",
            f"{row['false_negatives']:,}",
            _number(row["mu_lower_bound"]),
            _number(row["mu_theoretical"]),
            _number(row["epsilon_lower_bound"]),
            _number(row["epsilon_theoretical"]),
            FLAG_MARK if row["flagged"] else "ok",
        ]
        for row in report["white_box"]["rows"]
    ]


def preamble(report: dict[str, Any]) -> str:
    """Privacy unit, strategy and recomputation tolerance: how to read the figures."""
    units = sorted({p["privacy_unit"] for p in report["platforms"] if "privacy_unit" in p})
    tolerance = report["tolerance"]
    return (
        f"privacy unit: {'; '.join(units) or '-'}; strategy {report['strategy']}; ε recomputed "
        f"with Google dp_accounting (PLD, RDP), agreement required within "
        f"{100 * tolerance['relative']:g} % + {tolerance['absolute']:g}"
    )


def summary_text(report: dict[str, Any]) -> str:
    """The printed summary: platforms, a person's ε, bytes on the wire, canaries, the
    white-box audit, flags."""
    model = report["model"]
    parts = [
        preamble(report),
        markdown_table(PLATFORM_HEADER, platform_rows(report)),
    ]
    if report["person_epsilon"]:
        parts.append(f"{person_heading(report)}:\n")
        parts[-1] += markdown_table(PERSON_HEADER, person_rows(report))
    parts += [
        f"full model (fp32): {model['full_model_bytes']:,} B; shared tensors "
        f"{len(model['shared_tensors'])} ({model['shared_bytes']:,} B raw); bytes below are "
        "serialised payloads as sent",
        markdown_table(BYTES_HEADER, bytes_rows(report)),
    ]
    if report["canary"]:
        confidence = report["canary"]["confidence"]
        parts.append(f"canary audit (confidence {confidence}):\n")
        parts[-1] += markdown_table(CANARY_HEADER, canary_rows(report))
    if report.get("white_box"):
        parts.append(f"{white_box_heading(report)}:\n")
        parts[-1] += markdown_table(WHITE_BOX_HEADER, white_box_rows(report))
    flags = report["flags"]
    lines = [f"note: {note}" for note in report["notes"]]
    lines.append(f"flags: {len(flags)}" if flags else "flags: 0 (audit clean)")
    lines += [f"  {FLAG_MARK} [{f['code']}] {f['message']}" for f in flags]
    return "\n\n".join([*parts, "\n".join(lines)])


# --- HTML -------------------------------------------------------------------------------------


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def epsilon_plot(report: dict[str, Any]) -> str | None:
    """Cumulative ε after each ledger entry: recorded PRV and RDP, recomputed PLD, budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    platforms = [p for p in report["platforms"] if p.get("rounds")]
    if not platforms:
        return None
    figure, axis = plt.subplots(figsize=(7, 4))
    for index, p in enumerate(platforms):
        color = f"C{index % 10}"
        x = list(range(1, len(p["rounds"]) + 1))
        axis.plot(
            x, [r["epsilon_prv"] for r in p["rounds"]], "o-", color=color, label=p["platform"]
        )
        axis.plot(x, [r["epsilon_rdp"] for r in p["rounds"]], ":", color=color)
        axis.plot(x, [r["epsilon_pld_recomputed"] for r in p["rounds"]], "x", color="black")
        axis.axhline(p["epsilon_budget"], color=color, linestyle="--", linewidth=0.8)
    axis.xaxis.get_major_locator().set_params(integer=True)
    axis.set_xlabel("ledger entry (executed round)")
    axis.set_ylabel("cumulative ε")
    axis.set_title("ε: recorded PRV (—o), recorded RDP (···), recomputed PLD (x), budget (--)")
    axis.legend()
    uri = _png(figure)
    plt.close(figure)
    return uri


def bytes_plot(report: dict[str, Any]) -> str | None:
    """Bytes per round on the wire against the full model size (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["wire"]["bytes_per_round"]
    if not rows:
        return None
    figure, axis = plt.subplots(figsize=(7, 4))
    x = [r["round"] for r in rows]
    series = [("train sent", "train_sent"), ("train received", "train_received")]
    series.append(("largest single upload", "largest_upload"))
    for offset, (label, key) in zip((-0.27, 0.0, 0.27), series, strict=True):
        axis.bar([v + offset for v in x], [r[key] for r in rows], 0.27, label=label)
    full = report["model"]["full_model_bytes"]
    axis.axhline(full, color="red", label="full model (fp32)")
    smallest = min((r["largest_upload"] for r in rows if r["largest_upload"]), default=full)
    axis.set_ylim(smallest / 10, full * 3)
    axis.set_yscale("log")
    axis.set_xlabel("round")
    axis.set_ylabel("bytes")
    axis.set_xticks(x)
    axis.legend()
    uri = _png(figure)
    plt.close(figure)
    return uri


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="{"flag" if FLAG_MARK in cell else ""}">{html.escape(cell)}</td>'
            for cell in row
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 75em; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th { background: #eee; } .flag { color: #fff; background: #c00; font-weight: bold; }
li.flag { background: none; color: #c00; } .clean { color: #080; font-weight: bold; }
"""


def render_html(report: dict[str, Any]) -> str:
    """The whole report as one HTML page (tables, flags in red, embedded plots)."""
    e = html.escape
    flags = report["flags"]
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>FedFuse audit</title>"
        f"<style>{STYLE}</style></head><body>",
        f"<h1>Privacy audit of {e(report['run_dir'])}</h1>",
        "<h2>Flags</h2>",
        "<ul>"
        + "".join(f'<li class="flag">[{e(f["code"])}] {e(f["message"])}</li>' for f in flags)
        + "</ul>"
        if flags
        else '<p class="clean">No flags: the audit is clean.</p>',
        "<h2>Platforms</h2>",
        f"<p>{e(preamble(report))}.</p>",
        _html_table(PLATFORM_HEADER, platform_rows(report)),
    ]
    if report["person_epsilon"]:
        parts += [
            "<h2>A person's ε across the federation</h2>",
            f"<p>{e(person_heading(report))}.</p>",
            _html_table(PERSON_HEADER, person_rows(report)),
        ]
    for p in report["platforms"]:
        if p.get("rounds"):
            header = [
                "entry",
                "round",
                "σ",
                "q",
                "steps",
                "C",
                "ε round (PLD)",
                "ε PRV",
                "ε RDP",
                "ε PLD recomp.",
                "ε RDP recomp.",
            ]
            rows = [
                [str(r["index"]), str(r["round"])]
                + [
                    _number(r[k])
                    for k in (
                        "noise_multiplier",
                        "sample_rate",
                        "steps",
                        "max_grad_norm",
                        "epsilon_round_pld",
                        "epsilon_prv",
                        "epsilon_rdp",
                        "epsilon_pld_recomputed",
                        "epsilon_rdp_recomputed",
                    )
                ]
                for r in p["rounds"]
            ]
            parts += [f"<h3>{e(p['platform'])}: {e(p['ledger'])}</h3>", _html_table(header, rows)]
    for title, uri in (
        ("ε per round", epsilon_plot(report)),
        ("Bytes per round", bytes_plot(report)),
    ):
        if uri:
            parts.append(f"<h2>{title}</h2><img alt='{title}' src='{uri}'>")
    model = report["model"]
    parts += [
        "<h2>On the wire</h2>",
        f"<p>Full model (fp32): {model['full_model_bytes']:,} B; shared tensors: "
        f"{len(model['shared_tensors'])} ({model['shared_bytes']:,} B raw). Bytes are the "
        "serialised payloads as sent.</p>",
        _html_table(BYTES_HEADER, bytes_rows(report)),
    ]
    if report["canary"]:
        parts += [
            f"<h2>Canary audit (confidence {e(str(report['canary']['confidence']))})</h2>",
            _html_table(CANARY_HEADER, canary_rows(report)),
        ]
    if report.get("white_box"):
        parts += [
            "<h2>White-box audit of the DP step</h2>",
            f"<p>{e(white_box_heading(report))}.</p>",
            _html_table(WHITE_BOX_HEADER, white_box_rows(report)),
        ]
    if report["notes"]:
        parts.append(
            "<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in report["notes"]) + "</ul>"
        )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
