"""The Vagrant VM (issue #7): what can be checked without a hypervisor."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from conftest import ROOT


def test_vagrantfile_validates():
    vagrant = shutil.which("vagrant")
    assert vagrant, "vagrant is not installed: scripts/setup.sh installs it"
    r = subprocess.run([vagrant, "validate", "--ignore-provider"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "VAGRANT_HOME": str(ROOT / ".vagrant.d-test")}, timeout=120)
    shutil.rmtree(ROOT / ".vagrant.d-test", ignore_errors=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "validated successfully" in r.stdout


def test_vagrantfile_provisions_with_the_readme_setup_step():
    vf = (ROOT / "Vagrantfile").read_text()
    provision = re.findall(r'config\.vm\.provision "shell".*?SHELL\n(.*?)\n\s*SHELL', vf, re.S)
    assert len(provision) == 1, "exactly one provisioner"
    body = provision[0]
    assert "bash /vagrant/scripts/setup.sh" in body  # the same entry point...
    assert "apt-get" not in body and "pip" not in body  # ...and no second install recipe
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^setup:\n\tbash scripts/setup.sh$", makefile, re.M)
    assert re.search(r"^test: setup$", makefile, re.M) and re.search(r"^demo: setup$", makefile, re.M)
    readme = (ROOT / "README.md").read_text()
    assert "sudo make demo" in readme and "sudo make test" in readme
    assert 'vagrant ssh -c "cd /vagrant && sudo make demo"' in readme
    for provider in ("virtualbox", "libvirt"):
        assert f'config.vm.provider "{provider}"' in vf
    assert int(re.search(r'VM_CPUS = Integer\(ENV.fetch\("TESTBED_VM_CPUS", "(\d+)"\)\)', vf).group(1)) >= 2
    assert int(re.search(r'ENV.fetch\("TESTBED_VM_MEMORY", "(\d+)"\)', vf).group(1)) >= 4096


@pytest.mark.root
@pytest.mark.timeout(1000)  # a fresh venv downloads numpy, pandas, scipy, pyarrow, matplotlib
def test_setup_step_from_scratch_as_the_vm_runs_it(tmp_path):
    """scripts/setup.sh with a fresh virtual environment outside the checkout, exactly
    as the Vagrant provisioner calls it; twice (idempotent)."""
    venv = tmp_path / "venv"
    link = "/usr/local/bin/testbed"
    before = os.readlink(link) if os.path.islink(link) else None
    try:
        for _ in range(2):
            r = subprocess.run(["bash", str(ROOT / "scripts/setup.sh")], env={**os.environ, "TESTBED_VENV": str(venv)},
                               capture_output=True, text=True, timeout=900)
            assert r.returncode == 0, r.stderr[-2000:]
            assert f"venv {venv}" in r.stdout
        r = subprocess.run([str(venv / "bin/testbed"), "--version"], capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.startswith("testbed ")
        assert os.readlink(link) == str(venv / "bin/testbed")
    finally:
        if before:
            os.remove(link)
            os.symlink(before, link)


def test_a_vm_run_is_marked_in_the_manifest(tmp_path):
    """The provisioner marks the VM; manifest.json's machine.provisioned_by reads it."""
    from testbed.experiment import provisioned_by

    vf = (ROOT / "Vagrantfile").read_text()
    assert 'echo "TESTBED_MACHINE=vagrant" >> /etc/testbed.env' in vf
    env = tmp_path / "testbed.env"
    env.write_text("VENV=/opt/testbed/venv\nTESTBED_MACHINE=vagrant\n")
    assert provisioned_by(str(env)) == "vagrant"
    env.write_text("VENV=/opt/testbed/venv\n")
    assert provisioned_by(str(env)) is None
    assert provisioned_by(str(tmp_path / "missing")) is None
