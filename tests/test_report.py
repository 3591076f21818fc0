"""Reports from raw rows (no root): summaries count what the rows hold, conclusions
follow the data, and `testbed report` rebuilds the same files byte for byte.

The raw rows here are made up with known properties (a rotation and a uniform random
choice over backends; latency that grows with the Services for one variant and not
the other) — they test the arithmetic, not the kernel (tests/test_experiment.py runs
the real thing)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from testbed import report

BACKENDS = ["myapp-a", "myapp-b", "myapp-c"]


def _rows(variant: str, mode: str, services: int, rep: int, n: int, rng: np.random.Generator, *, rotate: bool,
          base_us: float, per_1k_us: float) -> pd.DataFrame:
    warm = 5
    total = n + warm
    if rotate:
        backend = [BACKENDS[i % 3] for i in range(total)]
    else:
        backend = list(rng.choice(BACKENDS, size=total))
    connect = base_us + per_1k_us * services / 1000 + rng.exponential(3.0, size=total)
    trial = f"{mode}-e3-s{services}-r{rep}"
    return pd.DataFrame({
        "client": "default/toolbox-x", "worker": 0, "seq": np.arange(total), "start_ns": np.arange(total) * 100_000,
        "lag_us": 0.0, "resolve_us": np.nan, "connect_us": connect, "total_us": connect + 50.0, "bytes": 200,
        "status": 200, "backend": backend, "source_seen": "", "error": ["ECONNRESET" if i == warm + 7 else "" for i in range(total)],
        "warmup": np.arange(total) < warm, "client_ip": "10.233.64.3", "client_node": "node1", "target": "clusterip",
        "via": "clusterIP", "entry": "all", "ask": "hostname", "service": "default/my-clusterip-service", "protocol": "http",
        "connection": "new", "dst": "10.233.1.1:80", "expected_backends": ",".join(BACKENDS), "dispatch_position": services + 1,
        "dispatch_total": services + 3, "measures": "latency,fairness", "trial": trial, "variant": variant, "mode": mode,
        "proxy_backend": "legacy" if mode == "iptables" else "", "scheduler": "rr" if mode == "ipvs" else "",
        "kernel": "host", "services": services, "services_total": services + 5, "endpoints": 3, "rep": rep,
    })


def _sync(variant: str, mode: str, services: int, rep: int, per_svc_s: float) -> pd.DataFrame:
    rows = []
    for op in ("full", "add_one", "delete_one"):
        for node in ("node1", "node2", "node3"):
            rows.append({"node": node, "full": op == "full", "render_s": 0.001 + per_svc_s * services * 0.2,
                         "apply_s": 0.002 + per_svc_s * services, "changed_services": 1 if op != "full" else services + 4,
                         "nat_rules": 40 + (11 * services if mode == "iptables" else 0), "filter_rules": 4, "deleted_chains": 0,
                         "op": op, "wall_s": 0.01, "trial": f"{mode}-e3-s{services}-r{rep}", "variant": variant, "mode": mode,
                         "proxy_backend": "legacy" if mode == "iptables" else "", "scheduler": "rr" if mode == "ipvs" else "",
                         "kernel": "host", "services": services, "services_total": services + 5, "endpoints": 3, "rep": rep})
    return pd.DataFrame(rows)


@pytest.fixture
def results(tmp_path: Path) -> Path:
    rng = np.random.default_rng(11)
    samples, syncs = [], []
    for variant, mode, rotate, growth, sync_per in (("iptables (legacy)", "iptables", False, 10.0, 2e-5),
                                                    ("ipvs rr", "ipvs", True, 0.0, 0.0)):
        for services in (1, 1000, 5000):
            for rep in range(3):
                samples.append(_rows(variant, mode, services, rep, 600, rng, rotate=rotate, base_us=20.0, per_1k_us=growth))
                syncs.append(_sync(variant, mode, services, rep, sync_per))
    d = tmp_path / "res"
    d.mkdir()
    pd.concat(samples, ignore_index=True).to_parquet(d / "samples.parquet", index=False)
    pd.concat(syncs, ignore_index=True).to_parquet(d / "syncs.parquet", index=False)
    (d / "manifest.json").write_text(json.dumps({
        "name": "fake", "status": "complete", "kernel": {"release": "6.1.0", "runtime": "uml"},
        "machine": {"virtualization": "none", "cpus": 2}, "experiment": {"file": "x.yaml", "sha256": "ab" * 32},
        "trials": {"total": 18, "done": 18}, "skipped": {"nftables": "nftables cannot run on this kernel"}}))
    return d


def test_summary_counts_match_the_rows(results):
    samples = pd.read_parquet(results / "samples.parquet")
    s = report.summarize(samples)
    assert list(s.columns) == report.SUMMARY_COLUMNS
    assert len(s) == 2 * 3 * 3
    assert (s["requests"] == 600).all()  # warmup rows left out
    assert (s["errors"] == 1).all() and np.allclose(s["error_rate"], 1 / 600)
    # one trial by hand
    g = samples[(samples["trial"] == "iptables-e3-s1000-r1") & ~samples["warmup"]]
    row = s[s["trial"] == "iptables-e3-s1000-r1"].iloc[0]
    ok = g[g["error"] == ""]
    counts = ok["backend"].value_counts()
    assert row["backends"] == 3
    assert row["jain"] == pytest.approx(counts.sum() ** 2 / (3 * (counts**2).sum()))
    assert row["connect_p50_us"] == float(np.sort(ok["connect_us"])[int(np.ceil(0.5 * len(ok))) - 1])
    # the rotation is exact: counts 200/200/200 minus the one error
    rot = s[s["mode"] == "ipvs"]
    assert (rot["max_dev"] <= 1).all() and (rot["chi2_p"] > 0.99).all()


def test_conclusions_follow_the_data(results):
    samples = pd.read_parquet(results / "samples.parquet")
    summary = report.summarize(samples)
    sync = report.sync_table(pd.read_parquet(results / "syncs.parquet"))
    lt = report.latency_trend(summary, samples).set_index("variant")
    assert lt.loc["iptables (legacy)", "verdict"] == "grows"
    assert lt.loc["iptables (legacy)", "slope_us_per_1k"] == pytest.approx(10.0, rel=0.15)
    assert lt.loc["ipvs rr", "verdict"] == "flat"
    fv = report.fairness_verdicts(summary).set_index("variant")
    assert fv.loc["ipvs rr", "verdict"] == "exact"
    assert fv.loc["iptables (legacy)", "verdict"] == "multinomial"
    st = report.sync_trend(sync).set_index(["variant", "op"])
    assert st.loc[("iptables (legacy)", "full"), "verdict"] == "grows"
    assert st.loc[("ipvs rr", "full"), "verdict"] == "flat"
    text = "\n".join(report.conclusions(summary, sync, samples))
    assert "**iptables (legacy)**, clusterip: first-packet (connect) p10" in text and "**grows**" in text
    # failures are counted by kind over the measured requests (warm-up left out), and said
    for v in ("iptables (legacy)", "ipvs rr"):
        assert f"**{v}**, clusterip: 9 of 5,400 requests failed (ECONNRESET ×9)" in text
    clean = samples.assign(error="")
    assert report.failed_requests(clean) == ["No request failed (10,800 measured)."]
    assert report.failed_requests(samples.assign(warmup=True)) == []  # nothing measured: nothing to say


def _stretches(variant: str, mode: str, services: int, rep: int, slow_blocks: list[int], rng: np.random.Generator,
               factor: float = 1.0) -> pd.DataFrame:
    """600 requests in 10 stretches of 60, each fast (~100 us) or slow (~300 us), as the
    guest kernel's connect times come; ``factor`` scales every time (a real change)."""
    df = _rows(variant, mode, services, rep, 600, rng, rotate=True, base_us=0.0, per_1k_us=0.0)
    level = np.full(len(df), 100.0)
    for b in slow_blocks:
        level[5 + b * 60: 5 + (b + 1) * 60] = 300.0
    df["connect_us"] = (level + rng.normal(0, 5, len(df))) * factor
    return df


def test_state_stretches_are_not_taken_for_growth():
    """The same path measured in more slow stretches at the larger size: single requests
    look wildly significant, the trials' blocks do not; a real +40 % does show."""
    from scipy import stats as sps

    rng = np.random.default_rng(5)
    frames = []
    for variant, mode, factor in (("ipvs rr", "ipvs", 1.0), ("iptables (legacy)", "iptables", 1.4)):
        for services, slow in ((1, ([0], [0, 1, 2, 3], [5, 6, 7])), (2000, ([0, 1, 2, 3, 4, 5, 6], [8, 9], [1, 2, 3, 4]))):
            for rep, blocks in enumerate(slow):
                frames.append(_stretches(variant, mode, services, rep, blocks, rng, factor if services == 2000 else 1.0))
    samples = pd.concat(frames, ignore_index=True)
    summary = report.summarize(samples)
    lt = report.latency_trend(summary, samples).set_index("variant")
    ipvs = samples[(samples["mode"] == "ipvs") & ~samples["warmup"]]
    raw_p = sps.mannwhitneyu(ipvs[ipvs["services"] == 2000]["connect_us"], ipvs[ipvs["services"] == 1]["connect_us"],
                             alternative="greater").pvalue
    assert raw_p < 1e-9  # what a test on single requests would conclude
    assert lt.loc["ipvs rr", "mw_p"] > 0.05
    # the trend compares p10s (the fast level): the same path is flat; its p50s say "slow more often"
    assert lt.loc["ipvs rr", "verdict"] == "flat"
    ipvs_trials = summary[summary["mode"] == "ipvs"]
    assert ipvs_trials["connect_p50_us"].max() > 2 * ipvs_trials["connect_p50_us"].min()
    assert ipvs_trials["connect_p10_us"].max() < 1.1 * ipvs_trials["connect_p10_us"].min()
    assert lt.loc["iptables (legacy)", "verdict"] == "grows"
    assert list(report.block_stats(pd.Series([1.0, 2, 3, 4] * 10), pd.Series(range(40)), 50)) == [2.0, 2.0]
    assert list(report.block_stats(pd.Series([float(i) for i in range(40)]), pd.Series(range(40)))) == [1.0, 21.0]
    # too few requests for blocks that could ever show a change: unclear, not flat
    few = pd.concat([_rows("ipvs rr", "ipvs", n, 0, 30, rng, rotate=True, base_us=100.0, per_1k_us=500.0) for n in (1, 2000)],
                    ignore_index=True)
    lt = report.latency_trend(report.summarize(few), few).set_index("variant")
    assert lt.loc["ipvs rr", "verdict"] == "unclear"
    # a fall is printed with the p-value of the test that found it
    falls = samples.assign(connect_us=np.where(samples["services"] == 2000, samples["connect_us"] / 3, samples["connect_us"]))
    lines = report.conclusions(report.summarize(falls), pd.DataFrame(), falls)
    line = next(x for x in lines if x.startswith("**ipvs rr**, clusterip: first-packet"))
    assert line.endswith("**falls**.") and "Mann-Whitney p = 1)" not in line


def test_the_control_path_is_subtracted():
    """A ClusterIP target and the via: pod control from the same pods: the conclusion
    says how much more the Service path grew than the direct one."""
    rng = np.random.default_rng(2)
    frames = []
    for variant, mode, svc_per_1k, ctl_per_1k in (("ipvs rr", "ipvs", 10.0, 10.0), ("iptables (legacy)", "iptables", 30.0, 10.0)):
        for services in (1, 5000):
            frames.append(_rows(variant, mode, services, 0, 600, rng, rotate=True, base_us=100.0, per_1k_us=svc_per_1k))
            ctl = _rows(variant, mode, services, 0, 600, rng, rotate=True, base_us=100.0, per_1k_us=ctl_per_1k)
            frames.append(ctl.assign(target="direct", via="pod", backend="myapp-a", expected_backends="myapp-a"))
    samples = pd.concat(frames, ignore_index=True)
    summary = report.summarize(samples)
    lines = report.control_comparisons(report.latency_trend(summary, samples))
    assert len(lines) == 2
    ipvs = next(x for x in lines if x.startswith("**ipvs rr**, clusterip against direct"))
    ipt = next(x for x in lines if x.startswith("**iptables (legacy)**, clusterip against direct"))
    added = {k: float(x.split("adds **")[1].split(" µs")[0]) for k, x in (("ipvs", ipvs), ("ipt", ipt))}
    assert abs(added["ipvs"]) < 5 and 90 < added["ipt"] < 110  # 20 us per 1,000 more, over 5,000 Services


def test_build_writes_everything_and_rebuilds_byte_for_byte(results):
    report.build(results)
    for name in ("summary.csv", "sync.csv", "report.md", "report.html"):
        assert (results / name).stat().st_size > 0
    for plot in report.PLOTS:
        assert (results / f"{plot}.png").stat().st_size > 2000 and (results / f"{plot}.svg").stat().st_size > 2000
    md = (results / "report.md").read_text()
    assert "uml" in md and "Skipped" in md and "nftables cannot run on this kernel" in md
    assert "![" in md and "latency_vs_services.svg" in md
    html = (results / "report.html").read_text()
    assert "<table>" in html and "<img" in html
    first = {n: (results / n).read_bytes() for n in ("summary.csv", "sync.csv", "report.md", "latency_vs_services.svg")}
    report.build(results)
    for n, data in first.items():
        assert (results / n).read_bytes() == data, n
    sync = pd.read_csv(results / "sync.csv")
    assert len(sync) == 2 * 3 * 3 * 3 and (sync["nodes"] == 3).all()


def test_trials_folder_is_gathered_in_journal_order(results):
    """An unfinished run keeps raw rows per trial; build() gathers them."""
    samples = pd.read_parquet(results / "samples.parquet")
    syncs = pd.read_parquet(results / "syncs.parquet")
    (results / "samples.parquet").unlink()
    (results / "syncs.parquet").unlink()
    tdir = results / "trials"
    tdir.mkdir()
    ids = list(dict.fromkeys(samples["trial"]))[:4]
    for i in ids:
        samples[samples["trial"] == i].to_parquet(tdir / f"{i}.samples.parquet", index=False)
        syncs[syncs["trial"] == i].to_parquet(tdir / f"{i}.sync.parquet", index=False)
    (results / "trials.jsonl").write_text("".join(json.dumps({"trial": i}) + "\n" for i in reversed(ids)))
    report.build(results, final=False)
    got = pd.read_parquet(results / "samples.parquet")
    assert list(dict.fromkeys(got["trial"])) == list(reversed(ids))
    assert tdir.exists()
    report.build(results, final=True)
    assert not tdir.exists()
    assert len(pd.read_parquet(results / "samples.parquet")) == len(got)


def test_relative_growth_against_iptables(results):
    """Each other mode's slope as a fraction of iptables' on the same target."""
    samples = pd.read_parquet(results / "samples.parquet")
    lines = report.relative_growth(report.latency_trend(report.summarize(samples), samples))
    assert len(lines) == 1 and lines[0].startswith("**ipvs rr**, clusterip: ")
    frac = float(lines[0].split("µs per 1,000 Services, ")[1].split("×")[0])
    assert abs(frac) < 0.2  # the fixture's ipvs has no growth, its iptables +10 us per 1,000
    assert "the growth of iptables (legacy) on the same path" in lines[0]


def test_ipvs_growth_comes_with_the_address_note():
    """An ipvs variant whose latency grows gets the note on kube-ipvs0 addresses in a
    shared kernel; one that stays flat does not."""
    rng = np.random.default_rng(3)
    frames = [_rows("ipvs rr", "ipvs", n, 0, 600, rng, rotate=True, base_us=100.0, per_1k_us=per)
              for n in (1, 5000) for per in (20.0,)]
    grows = pd.concat(frames, ignore_index=True).assign(kernel="uml")
    assert report.IPVS_ADDRESS_NOTE in report.conclusions(report.summarize(grows), pd.DataFrame(), grows)
    on_host = grows.assign(kernel="host")  # the trace was made in the guest kernel: not said of other kernels
    assert report.IPVS_ADDRESS_NOTE not in report.conclusions(report.summarize(on_host), pd.DataFrame(), on_host)
    flat = pd.concat([_rows("ipvs rr", "ipvs", n, 0, 600, rng, rotate=True, base_us=100.0, per_1k_us=0.0) for n in (1, 5000)],
                     ignore_index=True).assign(kernel="uml")
    assert report.IPVS_ADDRESS_NOTE not in report.conclusions(report.summarize(flat), pd.DataFrame(), flat)
