"""Trust-bundle (root) rotation from the command line: `aimesh identity root status|prepare|
rotate` on a CA directory, the directory's crash safety, and a running control plane that
picks the change up on SIGHUP."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import hashes

from aimesh.control.v1 import control_plane_pb2 as pb
from aimesh.control.v1 import control_plane_pb2_grpc as pb_grpc
from aimesh.mesh import procs
from aimesh.mesh.cli import main as aimesh_main
from aimesh.mesh.control.identity import load_or_create_ca
from aimesh.mesh.security import ca as ca_module
from aimesh.mesh.security.ca import (
    DAY,
    CertificateAuthority,
    CertificateRejected,
    generate_key,
    make_csr,
    private_key_pem,
    verify_chain,
)
from aimesh.mesh.security.spiffe import load_certificate, load_certificates
from aimesh.mesh.security.tokens import issue_join_token

from .support import eventually
from .test_security_core import _cert, _pem

TD = "aimesh.local"
GPT4 = f"spiffe://{TD}/ns/default/sa/gpt-4"


def root(ca_dir: Path, *args: str) -> int:
    """`aimesh identity root ...`, in this process (it only reads and writes the directory)."""
    return aimesh_main(["identity", "root", *args, "--ca-dir", str(ca_dir)])


def roots(bundle_pem: str) -> list[str]:
    return [_pem(c) for c in load_certificates(bundle_pem)]


def fingerprint(pem: str) -> str:
    return load_certificate(pem).fingerprint(hashes.SHA256()).hex(":").upper()


def leaf(ca: CertificateAuthority) -> tuple[str, str]:
    _, csr = make_csr(GPT4)
    return ca.sign_csr(csr, GPT4)


def test_prepare_rotate_and_the_overlap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "ca"
    ca0, _ = load_or_create_ca(str(d), TD)
    old_root = ca0.root_pem
    old_leaf, old_chain = leaf(ca0)

    assert root(d, "status") == 0
    out = capsys.readouterr().out
    assert "1 root(s) in the trust bundle" in out and fingerprint(old_root) in out
    assert "prepared next root: none" in out and "retired roots still trusted: none" in out
    assert f"aimesh identity root prepare --ca-dir {d}" in out

    # Step 3 before step 1 is refused: new leaves would reach peers that do not trust them.
    assert root(d, "rotate") == 2
    assert "no root rotation is prepared: first aimesh identity root prepare" in (
        capsys.readouterr().err
    )

    # Step 1: the next root joins the bundle (on disk, and as loaded); signing is unchanged.
    assert root(d, "prepare") == 0
    out = capsys.readouterr().out
    assert "kill -HUP" in out and "wait one certificate lifetime" in out
    ca1 = CertificateAuthority.load(d)
    new_root = ca1.next_root_pem
    assert new_root is not None and new_root != old_root and ca1.root_pem == old_root
    assert roots(ca1.trust_bundle()) == [old_root, new_root]
    assert roots((d / "bundle.pem").read_text()) == [old_root, new_root]
    assert "prepared the next root CN=aimesh root CA" in out
    assert fingerprint(new_root) in out and "2 roots" in out
    still_old, chain = leaf(ca1)
    assert verify_chain(still_old, chain, old_root, now=time.time()) == GPT4
    assert root(d, "status") == 0
    out = capsys.readouterr().out
    assert "2 root(s)" in out and "prepared next root (trusted, not signing)" in out
    assert fingerprint(new_root) in out and "aimesh identity root rotate" in out
    assert root(d, "prepare") == 2
    assert "already prepared" in capsys.readouterr().err

    # Step 3: the prepared root signs; the old one stays trusted for the overlap.
    assert root(d, "rotate", "--overlap", "1h") == 0
    captured = capsys.readouterr()
    assert "prepared only" in captured.err  # a warning: nobody waited a lifetime here
    assert "signing switched to root CN=aimesh root CA" in captured.out
    assert fingerprint(old_root) in captured.out and "(overlap 1h)" in captured.out
    assert not list(d.glob("next-*"))
    ca2 = CertificateAuthority.load(d)
    assert ca2.root_pem == new_root and not ca2.rotation_prepared
    assert roots(ca2.trust_bundle()) == [new_root, old_root]
    [retired] = ca2.retired_roots
    assert 3590 < retired.trusted_until - time.time() <= 3600
    new_leaf, new_chain = leaf(ca2)
    now = time.time()
    assert verify_chain(new_leaf, new_chain, new_root, now=now) == GPT4
    with pytest.raises(CertificateRejected, match="foreign CA"):
        verify_chain(new_leaf, new_chain, old_root, now=now)
    assert verify_chain(old_leaf, old_chain, ca2.trust_bundle(), now=now) == GPT4
    assert root(d, "status") == 0
    out = capsys.readouterr().out
    assert "retired root still trusted" in out and "trusted until" in out
    assert "prepared next root: none" in out

    # After the overlap (a clock an hour on): the old root is gone, its leaves rejected.
    later = CertificateAuthority.load(d, clock=lambda: time.time() + 3601)
    assert roots(later.trust_bundle()) == [new_root]
    with pytest.raises(CertificateRejected, match="foreign CA"):
        verify_chain(old_leaf, old_chain, later.trust_bundle(), now=time.time())


async def test_each_retired_root_has_its_own_overlap(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "ca"
    first = load_or_create_ca(str(d), TD)[0].root_pem
    assert root(d, "prepare") == 0 and root(d, "rotate", "--overlap", "1h") == 0
    second = CertificateAuthority.load(d).root_pem
    assert root(d, "prepare") == 0 and root(d, "rotate", "--overlap", "1s") == 0
    third = CertificateAuthority.load(d).root_pem
    assert roots(CertificateAuthority.load(d).trust_bundle()) == [third, first, second]

    await eventually(
        lambda: len(roots(CertificateAuthority.load(d).trust_bundle())) == 2,
        what="the 1s overlap to end",
    )
    assert roots(CertificateAuthority.load(d).trust_bundle()) == [third, first]
    capsys.readouterr()
    assert root(d, "status") == 0
    out = capsys.readouterr().out
    assert fingerprint(first) in out and fingerprint(second) not in out


def test_misuse_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert root(tmp_path / "missing", "status") == 2
    assert "holds no mesh CA (no ca.json)" in capsys.readouterr().err
    d = tmp_path / "ca"
    load_or_create_ca(str(d), TD)
    assert root(d, "prepare", "--root-cert", str(tmp_path / "x.pem")) == 2
    assert "pass both --root-cert and --root-key" in capsys.readouterr().err
    argv = ["--root-cert", str(tmp_path / "x.pem"), "--root-key", str(tmp_path / "x.key")]
    assert root(d, "prepare", *argv) == 2
    assert f"--root-cert {tmp_path / 'x.pem'}: No such file" in capsys.readouterr().err
    assert not CertificateAuthority.load(d).rotation_prepared  # nothing written
    with pytest.raises(SystemExit) as exc:
        root(d, "rotate", "--overlap", "soon")
    assert exc.value.code == 2
    assert "not a duration" in capsys.readouterr().err


def _operator_files(tmp_path: Path, name: str) -> list[str]:
    key = generate_key()
    now = time.time()
    cert = _cert(key, key, cn=name, ca=True, not_before=now - 60, not_after=now + 3650 * DAY)
    (tmp_path / f"{name}.pem").write_text(_pem(cert))
    (tmp_path / f"{name}.key").write_text(private_key_pem(key))
    return [
        "--root-cert",
        str(tmp_path / f"{name}.pem"),
        "--root-key",
        str(tmp_path / f"{name}.key"),
    ]


def test_operator_roots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "ca"
    first = _operator_files(tmp_path, "root1")
    ca = CertificateAuthority.from_operator_root(
        Path(first[1]).read_text(), Path(first[3]).read_text(), trust_domain=TD
    )
    ca.to_pem_files(d)
    assert root(d, "prepare") == 2
    assert "pass the next root with --root-cert PEM --root-key PEM" in capsys.readouterr().err
    assert root(d, "prepare", *_operator_files(tmp_path, "root2")) == 0
    assert root(d, "rotate") == 0  # the default overlap: a day's certificates plus skew
    loaded = CertificateAuthority.load(d)
    assert load_certificate(loaded.root_pem).subject.rfc4514_string() == "CN=root2"
    assert loaded.operator_root and not (d / "root.key").exists()
    [retired] = loaded.retired_roots
    assert DAY < retired.trusted_until - time.time() <= DAY + 60


def test_a_write_that_stops_anywhere_loses_no_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rotate` writing the directory, stopped after each file in turn: the directory then
    loads with both roots trusted, or fails naming the file while the next root's keys are
    still on disk; a leftover next-* equal to the current root is no prepared rotation."""
    src = tmp_path / "src"
    ca, _ = load_or_create_ca(str(src), TD)
    ca.prepare_root_rotation()
    ca.to_pem_files(src)
    old, new = ca.root_pem, ca.next_root_pem
    assert new is not None
    real_write = ca_module._write
    stops = 0
    while True:
        d = tmp_path / f"stop{stops}"
        ca.to_pem_files(d)
        rotating = CertificateAuthority.load(d)
        rotating.rotate_root(overlap=3600)
        written = 0

        def write(path: Path, text: str, mode: int, stop_at: int = stops) -> None:
            nonlocal written
            if written == stop_at:
                raise OSError("power cut")
            written += 1
            real_write(path, text, mode)

        monkeypatch.setattr(ca_module, "_write", write)
        try:
            rotating.to_pem_files(d)
            finished = True
        except OSError:
            finished = False
        monkeypatch.setattr(ca_module, "_write", real_write)
        try:
            loaded = CertificateAuthority.load(d)
        except ValueError as exc:  # a torn cert/key pair of the current root: named
            assert str(d) in str(exc), exc
            assert (d / "next-root.key").exists() and (d / "next-intermediate.key").exists()
        else:
            bundle = roots(loaded.trust_bundle())
            assert old in bundle and new in bundle, stops
            assert loaded.rotation_prepared == (loaded.root_pem == old)
        if finished:
            break
        stops += 1
    assert stops > 5 and loaded.root_pem == new and not list(d.glob("next-*"))

    # A rotation stopped after root.pem, before next-* went: no rotation is prepared.
    for name in ("root.pem", "root.key", "intermediate.pem", "intermediate.key"):
        (d / f"next-{name}").write_text((d / name).read_text())
        (d / f"next-{name}").chmod(0o600)
    assert not CertificateAuthority.load(d).rotation_prepared


# -- a real control plane: SIGHUP reloads the CA directory --------------------------------


def test_reload_keeps_the_ca_on_any_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The SIGHUP handler in-process: each outcome is one line on stderr."""
    from aimesh.mesh.control.identity import IdentityService
    from aimesh.mesh.control.main import reload_ca

    d = tmp_path / "ca"
    ca, _ = load_or_create_ca(str(d), TD)
    identity = IdentityService(ca)
    ca.min_leaf_lifetime = 1.0  # a test's setting survives the reload
    reload_ca(None, None, "")
    assert "SIGHUP ignored: no --ca-dir" in capsys.readouterr().err
    reload_ca(identity, str(d), "other.mesh")
    assert "CA reload rejected, keeping the current CA: " in capsys.readouterr().err
    reload_ca(identity, str(tmp_path / "missing"), TD)  # never creates a new CA there
    assert "CA reload rejected" in capsys.readouterr().err
    assert identity.ca is ca and not (tmp_path / "missing").exists()
    assert root(d, "prepare") == 0
    reload_ca(identity, str(d), TD)
    assert "reloaded the mesh CA from" in capsys.readouterr().err
    assert identity.ca is not ca and identity.ca.rotation_prepared
    assert identity.ca.min_leaf_lifetime == 1.0


def test_control_plane_reloads_its_ca_on_sighup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "ca"
    cp = procs.start_control_plane("--ca-dir", str(d), "--trust-domain", TD, admin=False)
    try:
        with grpc.insecure_channel(cp.address) as ch:
            identity = pb_grpc.IdentityStub(ch)

            def bundle() -> list[str]:
                reply = identity.GetTrustBundle(pb.GetTrustBundleRequest(), timeout=5)
                return roots(reply.trust_bundle_pem)

            [old_root] = bundle()
            assert root(d, "prepare") == 0
            assert bundle() == [old_root]  # the directory changed; the running CA did not
            cp.popen.send_signal(signal.SIGHUP)
            procs.wait_for_output(cp, "same signing root; trust bundle of 2 root(s) (was 1)")
            new_root = CertificateAuthority.load(d).next_root_pem
            assert new_root is not None and bundle() == [old_root, new_root]

            assert root(d, "rotate", "--overlap", "1h") == 0
            cp.popen.send_signal(signal.SIGHUP)
            procs.wait_for_output(cp, "a new root signs; trust bundle of 2 root(s)")
            assert bundle() == [new_root, old_root]
            # A workload joining now gets a leaf under the new root, and both roots.
            secret = CertificateAuthority.load(d).token_secret
            _, csr = make_csr(GPT4)
            signed = identity.SignCertificate(
                pb.SignCertificateRequest(
                    csr_pem=csr, join_token=issue_join_token(secret, GPT4, 60.0)
                ),
                timeout=5,
            )
            leaf_pem, chain_pem = _split(signed.certificate_chain_pem)
            assert verify_chain(leaf_pem, chain_pem, new_root, now=time.time()) == GPT4
            assert roots(signed.trust_bundle_pem) == [new_root, old_root]

            # A directory that does not load is rejected whole; the running CA stays.
            (d / "ca.json").write_text(json.dumps({"version": 1}))
            cp.popen.send_signal(signal.SIGHUP)
            procs.wait_for_output(cp, "CA reload rejected, keeping the current CA")
            assert bundle() == [new_root, old_root]
    finally:
        assert cp.terminate() == 0
    capsys.readouterr()


def _split(chain_pem: str) -> tuple[str, str]:
    certs = [_pem(c) for c in load_certificates(chain_pem)]
    return certs[0], "".join(certs[1:])
