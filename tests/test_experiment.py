"""Experiment files (validation, profiles, sweep expansion) and `testbed run` end to
end: a tiny real run on real namespaces and rules with the real traffic generator,
Ctrl-C in the middle of a run, and --resume."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import ROOT, sigint_default
from testbed import experiment, report, state, traffic
from testbed.errors import InputError

SEED = str(ROOT / "topologies" / "seed.yaml")

TINY = {
    "name": "tiny",
    "topology": SEED,
    "kernel": "host",
    "seed": 3,
    "repetitions": 1,
    "modes": [{"mode": "iptables", "backend": "legacy"}],
    "sweep": {"services": [0, 300], "endpoints": [3]},
    "measure": ["latency", "fairness", "sync"],
    "traffic": {
        "connection": "new",
        "requests": 120,
        "warmup": 10,
        "targets": [
            {"name": "clusterip", "service": "default/my-clusterip-service", "via": "clusterIP", "from": ["app=toolbox"],
             "measure": ["latency", "fairness", "source_ip", "per_node"], "source_order": "sequential"},
            {"name": "nodeport", "service": "default/my-nodeport-service", "via": "nodePort", "node": "node3", "from": ["client1"]},
            {"name": "lb", "service": "default/my-lb-service", "via": "loadBalancer", "from": ["client2"]},
            {"name": "direct", "service": "default/my-clusterip-service", "via": "pod", "from": ["app=toolbox"],
             "requests": 60, "measure": ["latency", "fairness", "source_ip"]},
        ],
    },
    "profiles": {"bigger": {"sweep": {"services": [0, 100, 200]}, "repetitions": 2}},
}


def write(tmp_path: Path, doc: dict, name: str = "exp.yaml") -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(p)


def mutate(fn) -> dict:  # noqa: ANN001
    d = copy.deepcopy(TINY)
    fn(d)
    return d


# --------------------------------------------------------------------------- schema (no root)

BAD = {
    "unknown field": (lambda d: d.update(modez=[]), 'modez: unknown field "modez"'),
    "bad mode": (lambda d: d.update(modes=["userspace"]),
                 'modes[0]: Unsupported value: "userspace": supported values: "iptables", "ipvs", "nftables"'),
    "bad backend": (lambda d: d.update(modes=[{"mode": "iptables", "backend": "xtables"}]),
                    'modes[0].backend: Unsupported value: "xtables": supported values: "legacy", "nft"'),
    "scheduler on iptables": (lambda d: d.update(modes=[{"mode": "iptables", "scheduler": "rr"}]),
                              'modes[0]: Invalid value: "rr": scheduler applies to mode "ipvs" only'),
    "bad scheduler": (lambda d: d.update(modes=[{"mode": "ipvs", "scheduler": "fifo"}]),
                      'modes[0]: Unsupported value: "fifo": supported values: "rr", "wrr", "lc", "wlc", "lblc", "lblcr", '
                      '"dh", "sh", "sed", "nq", "mh"'),
    "negative services": (lambda d: d["sweep"].update(services=[0, -5]),
                          "sweep.services: Invalid value: -5: must be between 0 and 60000, inclusive"),
    "kernel": (lambda d: d.update(kernel="qemu"), 'kernel: Unsupported value: "qemu": supported values: "host", "uml", "auto"'),
    "no targets": (lambda d: d["traffic"].update(targets=[]), "traffic.targets: Required value: at least one target"),
    "no from": (lambda d: d["traffic"]["targets"][0].pop("from"), "traffic.targets[0].from: Required value"),
    "unknown service": (lambda d: d["traffic"]["targets"][0].update(service="default/nope"),
                        'traffic.targets[0].service: Not found: "default/nope": no Service of that name in the topology'),
    "nodePort of a ClusterIP": (lambda d: d["traffic"]["targets"][0].update(via="nodePort"),
                                'traffic.targets[0].via: Invalid value: "nodePort": Service default/my-clusterip-service has '
                                "type ClusterIP (no nodePort)"),
    "unknown source": (lambda d: d["traffic"]["targets"][1].update({"from": ["client9"]}),
                       'traffic.targets[1].from: Not found: "client9": no client, node or pod of that name (or pods matching it)'),
    "bad connection": (lambda d: d["traffic"].update(connection="persistent"),
                       'traffic.connection: Unsupported value: "persistent": supported values: "new", "keepalive"'),
    "bad source order": (lambda d: d["traffic"].update(source_order="random"),
                         'traffic.source_order: Unsupported value: "random": supported values: "parallel", "sequential"'),
    "zero requests": (lambda d: d["traffic"].update(requests=0),
                      "traffic.requests: Invalid value: 0: must be greater than or equal to 1"),
    "unbounded": (lambda d: d["traffic"].pop("requests"),
                  "traffic.targets[0].requests: Required value: requests or duration (here or under traffic)"),
    "missing topology": (lambda d: d.update(topology="nope.yaml"),
                         'topology: Invalid value: "nope.yaml": no such file (relative to the experiment file)'),
    "background sorts after the probe": (
        lambda d: d.update(background={"namespace": "zzz"}),
        'background.namespace: Invalid value: "zzz": must sort before the namespace of every target ("default", '
        "default/my-clusterip-service) so the probed Service is last in kube-proxy's dispatch order"),
    "more Services than the CIDR": (
        lambda d: d["sweep"].update(services=[20000]),
        "sweep.services: Invalid value: 20000: the topology's kubeServiceAddresses (10.233.0.0/18) has room for "
        "16377 background Services"),
    "duplicate target": (lambda d: d["traffic"]["targets"].append(dict(d["traffic"]["targets"][0])),
                         'traffic.targets: Duplicate value: "clusterip"'),
    "affinity without ClientIP": (lambda d: d["traffic"]["targets"][0].update(measure=["affinity"]),
                                  'traffic.targets[0].measure: Invalid value: "affinity": Service default/my-clusterip-service '
                                  "has no sessionAffinity: ClientIP"),
    "bad profile": (lambda d: d.update(profiles={"quick": {"sweep": {"services": ["many"]}}}),
                    'profiles.quick.sweep.services[0]: Invalid value: "many": must be an integer (with profile quick)'),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_experiment_is_one_line(tmp_path, case):
    fn, want = BAD[case]
    f = write(tmp_path, mutate(fn))
    with pytest.raises(InputError) as e:
        experiment.load(f)
    assert str(e.value) == f"{f}: {want}"
    assert "\n" not in str(e.value)


def test_cli_shows_one_line_without_traceback(tmp_path):
    f = write(tmp_path, mutate(lambda d: d.update(kernel="qemu")))
    r = subprocess.run([sys.executable, "-m", "testbed.experiment", "run", f], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f'error: {f}: kernel: Unsupported value: "qemu": supported values: "host", "uml", "auto"']


def test_unknown_profile_and_syntax_error(tmp_path):
    f = write(tmp_path, TINY)
    with pytest.raises(InputError, match=r'--profile: Unsupported value: "fast": profiles in this file: "bigger"'):
        experiment.load(f, profile="fast")
    bad = tmp_path / "syntax.yaml"
    bad.write_text("name: x\nmodes: [iptables\n")
    with pytest.raises(InputError, match=r"syntax.yaml: line 3, column 1: YAML syntax error"):
        experiment.load(str(bad))


def test_profile_overlay_and_trial_expansion(tmp_path):
    f = write(tmp_path, mutate(lambda d: d.update(modes=["iptables", {"mode": "ipvs"}, "nftables"],
                                                  sweep={"services": [1000, 0], "endpoints": [3, 10], "scheduler": ["rr", "sh"]})))
    spec = experiment.load(f).spec
    trials = experiment.expand(spec)
    keys = [v.key for v in experiment.variants(spec)]
    assert keys == ["iptables", "ipvs-rr", "ipvs-sh", "nftables"]
    assert len(trials) == 4 * 2 * 2 * 1
    # per variant, endpoints, then Services ascending (the background only grows)
    assert [t.id for t in trials[:4]] == ["iptables-e3-s0-r0", "iptables-e3-s1000-r0", "iptables-e10-s0-r0", "iptables-e10-s1000-r0"]
    loaded = experiment.load(write(tmp_path, TINY, "t.yaml"), profile="bigger")
    assert loaded.spec.sweep.services == [0, 100, 200] and loaded.spec.repetitions == 2
    assert loaded.spec.traffic.requests == 120  # untouched by the overlay
    assert len(experiment.expand(loaded.spec)) == 6


def test_inline_topology(tmp_path):
    docs = [d for d in yaml.safe_load_all(Path(SEED).read_text()) if d]
    f = write(tmp_path, mutate(lambda d: d.update(topology={"inline": docs})))
    loaded = experiment.load(f, workdir=str(tmp_path / "w"))
    assert Path(loaded.topology_file) == tmp_path / "w" / "topology.yaml"
    assert [n.name for n in loaded.cluster.nodes] == ["node1", "node2", "node3"]


def test_demo_experiment_and_profiles_validate():
    for profile in (None, "quick", "full"):
        loaded = experiment.load(str(ROOT / "experiments" / "ipvs_vs_iptables.yaml"), profile=profile)
        modes = {v.mode for v in experiment.variants(loaded.spec)}
        assert modes == {"iptables", "ipvs", "nftables"}
    quick = experiment.load(str(ROOT / "experiments" / "ipvs_vs_iptables.yaml"), profile="quick").spec
    assert max(quick.sweep.services) < 10000 and quick.repetitions == 2
    # the demo carries its control: the same pods straight to a pod, no Service
    assert [t.via for t in quick.traffic.targets] == ["clusterIP", "nodePort", "loadBalancer", "pod"]


def test_manifest_machine_fields():
    info = experiment.manifest_info()
    assert info["kernel"]["release"] == os.uname().release
    assert info["kernel"]["runtime"] in ("host", "uml")
    assert isinstance(info["machine"]["virtualization"], str) and info["machine"]["virtualization"]


# --------------------------------------------------------------------------- real runs (root)


def _clusters_of(prefix: str) -> list[str]:
    return [n for n in state.names() if n.startswith(prefix)]


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "testbed.experiment", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=240, **kw)


@pytest.mark.root
def test_tiny_run_end_to_end(tmp_path):
    f = write(tmp_path, TINY)
    out = tmp_path / "out"
    r = _run(["run", f, "--out", str(out)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert not _clusters_of("xtiny-")
    for name in ("samples.parquet", "samples.csv.gz", "syncs.parquet", "summary.csv", "sync.csv", "manifest.json",
                 "report.md", "report.html", "trials.jsonl", "experiment.yaml"):
        assert (out / name).stat().st_size > 0, name
    for plot in report.PLOTS:
        for ext in ("png", "svg"):
            assert (out / f"{plot}.{ext}").stat().st_size > 2000, (plot, ext)
    assert not (out / "trials").exists()  # consolidated once complete

    samples = pd.read_parquet(out / "samples.parquet")
    assert len(pd.read_csv(out / "samples.csv.gz")) == len(samples)
    summary = pd.read_csv(out / "summary.csv")
    for col in "mode,services,endpoints,target,requests,errors,p50_us,p90_us,p99_us,jain,cov,max_min,chi2,chi2_p".split(","):
        assert col in summary.columns
    overall = summary[summary["entry"] == "all"]
    assert len(overall) == 2 * 4  # 2 sizes x 4 targets
    # summary counts = sample counts
    measured = samples[(~samples["warmup"]) & (samples["ask"] == "hostname")]
    for _, row in overall[overall["target"] != "direct"].iterrows():
        g = measured[(measured["trial"] == row["trial"]) & (measured["target"] == row["target"])]
        assert row["requests"] == len(g) == 120
        assert row["errors"] == (g["error"] != "").sum() == 0
        counts = g["backend"].value_counts()
        assert row["backends"] == (counts > 0).sum() == 2  # both myapp pods answered
        assert row["p50_us"] == pytest.approx(float(g["total_us"].sort_values().iloc[59]))  # nearest rank 60 of 120
    # via: pod goes straight to one myapp pod (its IP and target port): no Service, no NAT
    direct = measured[measured["target"] == "direct"]
    assert len(direct) == 2 * 60 and direct["error"].eq("").all()
    assert direct["backend"].nunique() == 1 and direct["backend"].iloc[0].startswith("myapp-")
    assert direct["dst"].nunique() == 1 and direct["dst"].iloc[0].endswith(":8080") and direct["dst"].iloc[0].startswith("10.233.")
    assert (overall[overall["target"] == "direct"]["src_preserved"] == 1.0).all()
    # per-node rows of the clusterIP target add up to its overall row
    cip = summary[(summary["target"] == "clusterip")]
    for trial, g in cip.groupby("trial"):
        assert g[g["entry"] != "all"]["requests"].sum() == g[g["entry"] == "all"]["requests"].iloc[0]
        assert set(g["entry"]) == {"all", "from node1", "from node2", "from node3"}
    # source_order: sequential: the three pods sent one after another, 40 requests each
    rows = samples[samples["target"] == "clusterip"]
    for (trial, ask), g in rows.groupby(["trial", "ask"]):
        spans = sorted((int(x["start_ns"].min()), int((x["start_ns"] + x["total_us"] * 1000).max()), len(x[~x["warmup"]]))
                       for _, x in g.groupby("client"))
        assert len(spans) == 3, (trial, ask)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), (trial, ask, spans)  # no overlap
        if ask == "hostname":
            assert [n for _, _, n in spans] == [40, 40, 40]
    # pod -> ClusterIP keeps the pod's address (no masquerade from the pod CIDR)
    assert (overall[overall["target"] == "clusterip"]["src_preserved"] == 1.0).all()
    # the same pods send through the Service and straight to a pod from disjoint source
    # ports (IPVS would rewrite a direct reply that reuses a port it still holds)
    seen = samples[(samples["ask"] == "clientip") & samples["target"].isin(["clusterip", "direct"])]
    ports = seen.assign(port=seen["source_seen"].str.rsplit(":", n=1).str[1].astype(int)).groupby("target")["port"]
    assert len(ports.groups) == 2
    lo, hi = ports.min(), ports.max()
    assert traffic.SERVICE_PORTS[0] <= lo["clusterip"] and hi["clusterip"] <= traffic.SERVICE_PORTS[1]
    assert traffic.DIRECT_PORTS[0] <= lo["direct"] and hi["direct"] <= traffic.DIRECT_PORTS[1]
    # the probed Service is matched after every background Service
    big = overall[overall["services"] == 300]
    assert (big["dispatch_position"] > 300).all()

    sync = pd.read_csv(out / "sync.csv")
    assert set(sync["op"]) == {"full", "add_one", "delete_one"}
    full = sync[sync["op"] == "full"].set_index("services")
    assert full.loc[300, "nat_rules"] > full.loc[0, "nat_rules"] + 300 * 3  # iptables grows with N
    add = sync[sync["op"] == "add_one"]
    assert (add["changed_services"] == 1).all()

    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["trials"] == {"total": 2, "done": 2, "skipped_variants": 0}
    assert m["kernel"]["runtime"] == "host" and m["kernel"]["release"] == os.uname().release
    assert m["machine"]["virtualization"] and m["experiment"]["sha256"] and m["seed"] == 3
    assert "iptables-legacy" in m["tools"] and m["variants"]["iptables-legacy"]["backend"] == "legacy"
    assert "before" in m["host_load"] and "after" in m["host_load"]

    # `testbed report DIR` rebuilds the derived files from the raw rows, byte for byte
    before = {n: (out / n).read_bytes() for n in ("summary.csv", "sync.csv", "report.md")}
    (out / "summary.csv").unlink()
    r = _run(["report", str(out)])
    assert r.returncode == 0, r.stderr
    for n, data in before.items():
        assert (out / n).read_bytes() == data, n


@pytest.mark.root
def test_ctrl_c_keeps_finished_trials_and_resume_finishes(tmp_path):
    doc = mutate(lambda d: d.update(name="intr", sweep={"services": [0, 50, 100, 150]}))
    doc["traffic"]["targets"] = doc["traffic"]["targets"][:1]
    f = write(tmp_path, doc)
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "testbed.experiment", "run", f, "--out", str(out)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=sigint_default)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (out / "trials.jsonl").exists():
            time.sleep(0.1)
        assert (out / "trials.jsonl").exists(), "no trial finished"
        os.killpg(p.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground group
        stdout, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, stdout + stderr
    assert "interrupted" in stdout and "--resume" in stdout
    assert not _clusters_of("xintr-")  # torn down
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "interrupted"
    kept = [json.loads(line)["trial"] for line in (out / "trials.jsonl").read_text().splitlines()]
    assert 1 <= len(kept) < 4
    first = pd.read_parquet(out / "samples.parquet")
    assert set(first["trial"]) == set(kept)
    assert (out / "report.md").exists()  # a partial report of what finished

    r = _run(["run", "--resume", str(out)])
    assert r.returncode == 0, r.stdout + r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["trials"]["done"] == 4
    done = [json.loads(line)["trial"] for line in (out / "trials.jsonl").read_text().splitlines()]
    assert done[: len(kept)] == kept and len(done) == 4 == len(set(done))
    after = pd.read_parquet(out / "samples.parquet")
    old = first.sort_values(["trial", "seq", "target", "ask"]).reset_index(drop=True)
    new = after[after["trial"].isin(kept)].sort_values(["trial", "seq", "target", "ask"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(old, new)  # finished trials are kept, not re-run
    assert not _clusters_of("xintr-")
    r = _run(["run", "--resume", str(out)])  # nothing left to do
    assert r.returncode == 0 and "0 to run" in r.stdout


@pytest.mark.root
def test_a_guest_kernel_run_boots_one_guest_per_variant(tmp_path):
    """kernel: uml: every variant runs in a fresh guest (a guest process's pages are host
    mappings, and one process through a whole profile ran out of them); the host side
    builds the report from the journal."""
    from testbed import guest

    if not guest.available():
        pytest.skip("no guest kernel (user-mode-linux) here")
    doc = mutate(lambda d: d.update(kernel="uml", modes=[{"mode": "iptables", "backend": "legacy"}, {"mode": "ipvs", "scheduler": "rr"}]))
    doc["sweep"]["services"] = [0, 50]
    doc["traffic"]["requests"] = 60
    doc["traffic"]["targets"] = [t for t in doc["traffic"]["targets"] if t["name"] in ("clusterip", "direct")]
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "testbed.experiment", "run", write(tmp_path, doc), "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["trials"]["done"] == 4 and m["guest_or_host"] == "guest"
    assert m["guest"]["returncode"] == 0 and m["guest"]["host_cpu"] is not None
    log = (out / "guest.log").read_text()
    assert log.count("experiment tiny: 4 trials (4 to run)") == 1 and log.count("4 trials (2 to run)") == 1  # two guests
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary["mode"]) == {"iptables", "ipvs"} and (summary["errors"] == 0).all()
    assert not (out / "trials").exists() and (out / "report.md").stat().st_size > 0
    assert "against direct" in (out / "report.md").read_text()
