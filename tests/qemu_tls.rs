//! TLS interop with a real QEMU 7.2 (GnuTLS) over tcp loopback, both directions,
//! with certificates made at test time (`testkit::tls`) in QEMU's
//! `tls-creds-x509` layout:
//!
//! - QEMU -> `qmig recv --tls-creds`: one QEMU source (`tls-creds-x509`
//!   `endpoint=client`, `verify-peer=on`, `migrate-set-parameters tls-creds`,
//!   `tls-hostname`) first meets each refusal (a server certificate from another
//!   CA, a hostname mismatch, a client DN not on recv's `--tls-authz`, a plaintext
//!   recv, a plaintext QEMU to a TLS recv), then migrates with `--tls-authz` set
//!   to its certificate's DN: RAM exact.
//! - `qmig send --tls-creds` -> QEMU: one QEMU destination (`endpoint=server`,
//!   `verify-peer=on`, `tls-authz` with an `authz-list`) first meets each refusal
//!   (a client certificate from another CA, an expired one, a DN not on the list,
//!   a plaintext send, a hostname mismatch on our side), then loads the guest: RAM exact.
//!
//! Every refusal: one error line on our side naming the cause, the migration not
//! completed on QEMU's side, and the destination's RAM file untouched.

mod common;

use common::{assert_same_ram, one_line_error, qemu_or_skip, run_qmig, utf8, BackgroundQmig, TestDir};
use serde_json::{json, Value};
use std::fs;
use std::path::Path;
use std::time::Duration;
use testkit::pattern::{self, Pattern};
use testkit::qemu::{QemuConfig, QemuProcess};
use testkit::tls::{good_dir, write_dir, Ca, Validity, CLIENT_DN, SERVER_NAMES};

const RAM_LEN: u64 = 16 << 20;
const GUEST: Pattern = Pattern::Mixed { every: 4 };
const LIMIT: Duration = Duration::from_secs(30);
/// What a destination RAM file holds before a migration: any write shows.
const UNTOUCHED: u8 = 0xee;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A fresh destination RAM file full of [`UNTOUCHED`].
fn untouched_ram(path: &Path) {
    fs::write(path, vec![UNTOUCHED; RAM_LEN as usize]).unwrap();
}

fn assert_untouched(what: &str, path: &Path) {
    let data = fs::read(path).unwrap();
    assert!(data.iter().all(|&b| b == UNTOUCHED), "{what}: the destination RAM was written before/without a handshake");
}

/// A refusal of QEMU's source: what, recv's extra arguments, what recv's error
/// line names, QEMU's (`tls-creds`, `tls-hostname`).
type Case<'a> = (&'a str, Vec<&'a str>, &'a [&'a str], (&'a str, &'a str));

fn tls_creds(dir: &Path, endpoint: &str) -> Value {
    json!({"qom-type": "tls-creds-x509", "id": format!("tls-{endpoint}"), "dir": utf8(dir),
           "endpoint": endpoint, "verify-peer": true})
}

/// QEMU's source side: migrate to `uri` and wait for the end; the final status.
fn qemu_migrate(q: &mut QemuProcess, uri: &str) -> Value {
    q.migrate(uri).unwrap();
    q.wait_migration(LIMIT).unwrap()
}

#[test]
fn qemu_source_to_qmig_recv_over_tls() {
    let Some(_) = qemu_or_skip("qemu_source_to_qmig_recv_over_tls") else { return };
    let dir = TestDir::new("qemu-tls-in");
    let good = dir.join("good");
    let ca = good_dir(&good).unwrap();
    let src = dir.join("src.ram");
    let ram = pattern::generate(GUEST, 3, RAM_LEN as usize);
    fs::write(&src, &ram).unwrap();
    let dst = dir.join("dst.ram");

    let mut q = QemuProcess::start(&QemuConfig::new().ram("mem", &src, RAM_LEN)).unwrap();
    q.execute("object-add", Some(tls_creds(&good, "client"))).unwrap();
    let set = |q: &mut QemuProcess, creds: &str, hostname: &str| {
        q.execute("migrate-set-parameters", Some(json!({"tls-creds": creds, "tls-hostname": hostname}))).unwrap();
    };
    set(&mut q, "tls-client", "dest.qmig.test");
    let good_s = utf8(&good).to_string();

    // Each refusal: recv's arguments, what its error line must name, QEMU's settings.
    let other = Ca::new("another-ca").unwrap();
    let foreign = dir.join("foreign-server");
    write_dir(&foreign, &ca.cert_pem(), Some(&other.server(&SERVER_NAMES, Validity::Current).unwrap()), None).unwrap();
    let cases: [Case<'_>; 5] = [
        (
            "server certificate from another CA",
            vec!["--tls-creds", utf8(&foreign)],
            &["TLS session", "refused our certificate"],
            ("tls-client", "dest.qmig.test"),
        ),
        (
            "hostname mismatch (QEMU's tls-hostname)",
            vec!["--tls-creds", &good_s],
            &["TLS session", "tls-hostname"],
            ("tls-client", "elsewhere.example"),
        ),
        (
            "client not on the allow-list",
            vec!["--tls-creds", &good_s, "--tls-authz", "O=qmig test,CN=someone-else"],
            &["TLS handshake", CLIENT_DN, "tls-authz"],
            ("tls-client", "dest.qmig.test"),
        ),
        (
            "TLS peer, plaintext recv",
            vec![],
            &["started a TLS handshake", "not configured"],
            ("tls-client", "dest.qmig.test"),
        ),
        ("plaintext peer, TLS recv", vec!["--tls-creds", &good_s], &["does not speak TLS"], ("", "")),
    ];
    for (what, extra, needles, (creds, hostname)) in cases {
        untouched_ram(&dst);
        set(&mut q, creds, hostname);
        let mut args =
            vec!["--ram".to_string(), format!("mem={}", dst.display()), "--from".into(), "tcp:127.0.0.1:0".into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let r = BackgroundQmig::recv(&dir, &args.iter().map(String::as_str).collect::<Vec<_>>());
        let uri = r.listening(LIMIT);
        let info = qemu_migrate(&mut q, &uri);
        let (code, _, stderr) = r.wait(LIMIT);
        let line = one_line_error(what, code, &stderr, needles);
        assert_eq!(info["status"], "failed", "{what}: QEMU's source status: {info}");
        assert_untouched(what, &dst);
        eprintln!("{what}: qmig: {line}; QEMU: {}", info["error-desc"]);
    }

    // The real migration: QEMU checks the name dest.qmig.test, recv lets its DN in.
    set(&mut q, "tls-client", "dest.qmig.test");
    untouched_ram(&dst);
    let r = BackgroundQmig::recv(
        &dir,
        &[
            "--ram",
            &format!("mem={}", dst.display()),
            "--from",
            "tcp:127.0.0.1:0",
            "--tls-creds",
            &good_s,
            "--tls-authz",
            CLIENT_DN,
        ],
    );
    let uri = r.listening(LIMIT);
    let info = qemu_migrate(&mut q, &uri);
    let (code, last, stderr) = r.wait(LIMIT);
    assert_eq!(code, Some(0), "recv failed: {stderr}");
    assert_eq!(info["status"], "completed", "QEMU: {info}");
    let stats: Value = serde_json::from_str(&last).unwrap();
    assert_eq!(stats["status"], "completed", "{stats}");
    assert_eq!(stats["tls"]["peer-dn"], CLIENT_DN, "{stats}");
    assert_same_ram("QEMU -> qmig recv over TLS", &fs::read(&dst).unwrap(), &ram);
    let _ = q.quit(Duration::from_secs(5));
}

#[test]
fn qmig_send_to_qemu_over_tls() {
    let Some(_) = qemu_or_skip("qmig_send_to_qemu_over_tls") else { return };
    let dir = TestDir::new("qemu-tls-out");
    let good = dir.join("good");
    let ca = good_dir(&good).unwrap();
    let src = dir.join("src.ram");
    let ram = pattern::generate(GUEST, 4, RAM_LEN as usize);
    fs::write(&src, &ram).unwrap();
    let dst = dir.join("dst.ram");
    untouched_ram(&dst);

    let mut q = QemuProcess::start(&QemuConfig::new().ram("mem", &dst, RAM_LEN).incoming(true)).unwrap();
    q.execute("object-add", Some(tls_creds(&good, "server"))).unwrap();
    q.execute(
        "object-add",
        Some(json!({"qom-type": "authz-list", "id": "auth0", "policy": "deny",
                    "rules": [{"match": CLIENT_DN, "policy": "allow", "format": "exact"}]})),
    )
    .unwrap();
    q.execute("migrate-set-parameters", Some(json!({"tls-creds": "tls-server", "tls-authz": "auth0"}))).unwrap();
    let port = free_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    q.migrate_incoming(&uri).unwrap();

    let server = ca.server(&SERVER_NAMES, Validity::Current).unwrap();
    let client_dir = |name: &str, client: testkit::tls::Issued| {
        let d = dir.join(name);
        write_dir(&d, &ca.cert_pem(), Some(&server), Some(&client)).unwrap();
        utf8(&d).to_string()
    };
    let other = Ca::new("another-ca").unwrap();
    let foreign = client_dir("foreign-client", other.client("qmig-source", Validity::Current).unwrap());
    let expired = client_dir("expired-client", ca.client("qmig-source", Validity::Expired).unwrap());
    let intruder = client_dir("intruder", ca.client("intruder", Validity::Current).unwrap());
    let good_s = utf8(&good).to_string();
    let cases: [(&str, Vec<&str>, &[&str]); 5] = [
        (
            "client certificate from another CA",
            vec!["--tls-creds", &foreign],
            &["TLS session", "refused our certificate"],
        ),
        ("expired client certificate", vec!["--tls-creds", &expired], &["TLS session", "refused our certificate"]),
        ("client not on QEMU's authz-list", vec!["--tls-creds", &intruder], &["TLS session", "tls-authz"]),
        ("plaintext send to a TLS QEMU", vec![], &[]),
        (
            "hostname mismatch",
            vec!["--tls-creds", &good_s, "--tls-hostname", "elsewhere.example"],
            &["hostname mismatch", "elsewhere.example"],
        ),
    ];
    let ram_arg = format!("mem={}", src.display());
    for (what, extra, needles) in cases {
        let mut args = vec!["send", "--ram", &ram_arg, "--to", &uri];
        args.extend(extra);
        let r = run_qmig(&dir, &args, LIMIT);
        let line = one_line_error(what, r.status.code(), &r.stderr, needles);
        q.check_alive().unwrap_or_else(|e| panic!("{what}: QEMU destination: {e}; stderr: {}", q.stderr()));
        let info = q.query_migrate().unwrap();
        assert_ne!(info["status"], "completed", "{what}: QEMU: {info}");
        assert_untouched(what, &dst);
        eprintln!("{what}: qmig: {line}; QEMU: status {}, stderr: {}", info["status"], q.stderr().trim());
    }

    // The real migration, checking the name dest.qmig.test.
    let r = run_qmig(
        &dir,
        &["send", "--ram", &ram_arg, "--to", &uri, "--tls-creds", &good_s, "--tls-hostname", "dest.qmig.test"],
        LIMIT,
    );
    assert!(r.status.success(), "send failed: {}; QEMU: {}", r.stderr, q.stderr());
    let info = q.wait_migration(LIMIT).unwrap();
    assert_eq!(info["status"], "completed", "QEMU: {info}");
    let stats: Value = serde_json::from_str(r.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(stats["return-path"]["shut"], 0, "{stats}");
    assert_same_ram("qmig send -> QEMU over TLS", &fs::read(&dst).unwrap(), &ram);
    let _ = q.quit(Duration::from_secs(5));
}

fn set_multifd(q: &mut QemuProcess, channels: u8) {
    q.qmp().unwrap().set_capabilities(&[("multifd", true)]).unwrap();
    q.execute("migrate-set-parameters", Some(json!({"multifd-channels": channels}))).unwrap();
}

/// Multifd over TLS with QEMU 7.2, both ways (each channel its own TLS session), and
/// CRLs (`ca-crl.pem`) both ways: a `qmig recv` whose CRL revokes QEMU's client
/// certificate refuses it, naming the CRL; then QEMU (multifd 2, tls-creds) ->
/// `qmig recv --multifd 2 --tls-creds`: RAM exact. A QEMU destination whose CRL
/// revokes our client certificate refuses it; then `qmig send --multifd 2
/// --tls-creds` -> that QEMU: RAM exact.
#[test]
fn multifd_and_crls_over_tls_with_qemu() {
    let Some(_) = qemu_or_skip("multifd_and_crls_over_tls_with_qemu") else { return };
    let dir = TestDir::new("qemu-tls-multifd");
    let ca = Ca::new("qmig-test-ca").unwrap();
    let server = ca.server(&SERVER_NAMES, Validity::Current).unwrap();
    let client = ca.client("qmig-source", Validity::Current).unwrap();
    let revoked = ca.client("revoked-source", Validity::Current).unwrap();
    let good = dir.join("good");
    write_dir(&good, &ca.cert_pem(), Some(&server), Some(&client)).unwrap();
    let good_s = utf8(&good).to_string();

    // QEMU -> qmig recv.
    let src = dir.join("src.ram");
    let ram = pattern::generate(GUEST, 11, RAM_LEN as usize);
    fs::write(&src, &ram).unwrap();
    let dst = dir.join("dst.ram");
    let mut q = QemuProcess::start(&QemuConfig::new().ram("mem", &src, RAM_LEN)).unwrap();
    q.execute("object-add", Some(tls_creds(&good, "client"))).unwrap();
    q.execute("migrate-set-parameters", Some(json!({"tls-creds": "tls-client", "tls-hostname": "dest.qmig.test"})))
        .unwrap();
    set_multifd(&mut q, 2);
    let crl_on_us = dir.join("revokes-qemu");
    write_dir(&crl_on_us, &ca.cert_pem(), Some(&server), None).unwrap();
    fs::write(crl_on_us.join("ca-crl.pem"), ca.crl(&[&client]).unwrap()).unwrap();
    for (what, creds) in [("recv's CRL revokes QEMU's certificate", utf8(&crl_on_us)), ("multifd", &good_s)] {
        untouched_ram(&dst);
        let ram_arg = format!("mem={}", dst.display());
        let r = BackgroundQmig::recv(
            &dir,
            &["--ram", &ram_arg, "--from", "tcp:127.0.0.1:0", "--tls-creds", creds, "--multifd", "2"],
        );
        let uri = r.listening(LIMIT);
        let info = qemu_migrate(&mut q, &uri);
        let (code, last, stderr) = r.wait(LIMIT);
        if what == "multifd" {
            assert_eq!(code, Some(0), "recv failed: {stderr}\nQEMU: {}", q.stderr());
            assert_eq!(info["status"], "completed", "QEMU: {info}");
            let stats: Value = serde_json::from_str(&last).unwrap();
            assert_eq!(stats["status"], "completed", "{stats}");
            assert_same_ram("QEMU -> qmig recv, multifd 2 over TLS", &fs::read(&dst).unwrap(), &ram);
        } else {
            let line = one_line_error(what, code, &stderr, &["TLS handshake", "revoked", "ca-crl.pem"]);
            assert_eq!(info["status"], "failed", "{what}: QEMU's source status: {info}");
            assert_untouched(what, &dst);
            eprintln!("{what}: qmig: {line}; QEMU: {}", info["error-desc"]);
        }
    }
    let _ = q.quit(Duration::from_secs(5));

    // qmig send -> QEMU; QEMU's CRL revokes the certificate "revoked-source".
    let src2 = dir.join("src2.ram");
    let ram2 = pattern::generate(GUEST, 12, RAM_LEN as usize);
    fs::write(&src2, &ram2).unwrap();
    let dst2 = dir.join("dst2.ram");
    untouched_ram(&dst2);
    let qemu_dir = dir.join("qemu-server");
    write_dir(&qemu_dir, &ca.cert_pem(), Some(&server), None).unwrap();
    fs::write(qemu_dir.join("ca-crl.pem"), ca.crl(&[&revoked]).unwrap()).unwrap();
    let revoked_dir = dir.join("revoked-client");
    write_dir(&revoked_dir, &ca.cert_pem(), Some(&server), Some(&revoked)).unwrap();
    let qemu_dest = || {
        let mut q = QemuProcess::start(&QemuConfig::new().ram("mem", &dst2, RAM_LEN).incoming(true)).unwrap();
        q.execute("object-add", Some(tls_creds(&qemu_dir, "server"))).unwrap();
        q.execute("migrate-set-parameters", Some(json!({"tls-creds": "tls-server"}))).unwrap();
        set_multifd(&mut q, 2);
        let uri = format!("tcp:127.0.0.1:{}", free_port());
        q.migrate_incoming(&uri).unwrap();
        (q, uri)
    };
    let ram_arg = format!("mem={}", src2.display());
    let send = |uri: &str, creds: &str, io_timeout: &str| {
        let args = [
            "send",
            "--ram",
            &ram_arg,
            "--to",
            uri,
            "--tls-creds",
            creds,
            "--tls-hostname",
            "dest.qmig.test",
            "--multifd",
            "2",
            "--io-timeout",
            io_timeout,
        ];
        run_qmig(&dir, &args, LIMIT)
    };
    let what = "QEMU's CRL revokes our certificate";
    let (mut q, uri) = qemu_dest();
    let r = send(&uri, utf8(&revoked_dir), "30");
    let line = one_line_error(what, r.status.code(), &r.stderr, &["TLS session", "refused our certificate"]);
    q.check_alive().unwrap_or_else(|e| panic!("{what}: QEMU destination: {e}; stderr: {}", q.stderr()));
    let info = q.query_migrate().unwrap();
    assert_ne!(info["status"], "completed", "{what}: QEMU: {info}");
    assert!(q.stderr().contains("The certificate has been revoked"), "{what}: QEMU: {}", q.stderr());
    assert_untouched(what, &dst2);
    eprintln!("{what}: qmig: {line}; QEMU: status {}, stderr: {}", info["status"], q.stderr().trim());

    // The same QEMU takes the next source.
    let r = send(&uri, &good_s, "30");
    assert!(r.status.success(), "send failed: {}; QEMU: {}", r.stderr, q.stderr());
    let info = q.wait_migration(LIMIT).unwrap();
    assert_eq!(info["status"], "completed", "QEMU: {info}");
    assert_same_ram("qmig send -> QEMU, multifd 2 over TLS", &fs::read(&dst2).unwrap(), &ram2);
    let _ = q.quit(Duration::from_secs(5));
}
