"""`testbed proxy render`: the pure heart, through the command line."""

from __future__ import annotations

from pathlib import Path

from conftest import ROOT, run_cli

VEC = ROOT / "tests/vectors/overall_iptables"
FAKE = ["--hostname-override", "test-node", "--node-ip", "192.168.0.2", "--cluster-cidr", "10.0.0.0/8",
        "--masquerade-mark", "0x4000", "--random-fully", "false"]  # kube-proxy's NewFakeProxier


def test_render_equals_vector_1_sorted():
    r = run_cli("proxy", "render", "--proxy-mode", "iptables", "-f", str(VEC / "services.yaml"),
                str(VEC / "endpointslices.yaml"), *FAKE, "--sorted", check=True)
    assert r.stdout == (VEC / "expected.txt").read_text()


def test_render_unsorted_is_restore_input_with_real_mark():
    r = run_cli("proxy", "render", "-f", str(VEC / "services.yaml"), "-f", str(VEC / "endpointslices.yaml"),
                "--hostname-override", "test-node", "--cluster-cidr", "10.0.0.0/8", "--nfacct", "false", check=True)
    lines = r.stdout.splitlines()
    assert lines[0] == "*filter" and lines[-1] == "COMMIT" and "*nat" in lines
    # a real kube-proxy formats the mark with Go's %#08x
    assert "-A KUBE-MARK-MASQ -j MARK --or-mark 0x00004000" in lines
    assert "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully" in lines
    assert not any("nfacct" in line for line in lines)


def test_render_bad_file_one_line(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Service\nmetadata: {name: x\n")
    r = run_cli("proxy", "render", "-f", str(bad))
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and str(bad) in r.stderr and "YAML syntax error" in r.stderr


def test_render_bad_flag_one_line():
    r = run_cli("proxy", "render", "-f", str(VEC / "services.yaml"), "--localhost-nodeports", "maybe")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: argument --localhost-nodeports: invalid boolean value: \"maybe\" (true or false) "
        "(see `testbed proxy render --help`)"
    ]


def test_render_nftables_equals_vector_3_in_normal_form():
    from testbed.proxy.nft_normalize import normal_form

    vec = ROOT / "tests/vectors/overall_nftables"
    r = run_cli("proxy", "render", "--proxy-mode", "nftables", "-f", str(vec / "services.yaml"), str(vec / "endpointslices.yaml"),
                "--hostname-override", "test-node", "--node-ip", "192.168.0.2", "--cluster-cidr", "10.0.0.0/8",
                "--masquerade-mark", "0x4000", "--nodeport-addresses", "192.168.0.2/32", "--service-cidrs", "172.30.0.0/16",
                "--sorted", check=True)
    assert r.stdout == normal_form((vec / "expected.txt").read_text()) + "\n"


def test_render_ipvs_prints_the_three_tools_inputs():
    r = run_cli("proxy", "render", "--proxy-mode", "ipvs", "-f", str(VEC / "services.yaml"), str(VEC / "endpointslices.yaml"),
                "--hostname-override", "test-node", "--node-ip", "192.168.0.2", "--cluster-cidr", "10.0.0.0/8", check=True)
    out = r.stdout
    for section in ("# ipvsadm -R (scheduler rr)", "# ipset restore", "# iptables-restore"):
        assert any(line.startswith(section) for line in out.splitlines()), section
    assert "-A -t 172.30.0.41:80 -s rr\n-a -t 172.30.0.41:80 -r 10.180.0.1:80 -m -w 1\n" in out
    r = run_cli("proxy", "render", "--proxy-mode", "ipvs", "-f", str(VEC / "services.yaml"), "--ipvs-scheduler", "no such")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
